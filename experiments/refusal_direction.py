"""Refusal is mediated by a single direction (Arditi et al. 2024), reproduced with interp's transforms.

    python -m experiments.refusal_direction [--model NAME_OR_DIR] [--n-train 64] [--system-prompt "..."]

Candidates: harmful - harmless difference of means of `resid_pre` at every layer x post-instruction template
position. All candidates are scored in vmapped sweeps on validation prompts (bypass: refusal score on harmful
prompts with the direction ablated everywhere; induce: refusal score on harmless prompts with it added at its
layer; KL on harmless prompts under ablation), filtered (layer < 0.8 L, KL < threshold, induce above the
harmless baseline) and the lowest bypass score is selected. The selected direction is applied three ways
(ablation hooks, orthogonalised weights, ActAdd) on test prompts, against a null distribution of `n_null` random
directions of the same norm (ablation on harmful and ActAdd on harmless test prompts, per-prompt refusal scores, one
stacked sweep each; greedy generations for the first random draw only).

Statistics (issue 39, `interp.stats`): rates with Wilson intervals; steered vs unsteered on the same prompts as
paired differences (bootstrap interval, sign-flip p; refusal rates: McNemar); the real effect against the null as a
per-prompt paired difference from the null's mean and as its percentile in the null (with the null's 5-95% band);
the verdict on the `primary` cell (named in the config, before the run), Holm-corrected over every cell in `CELLS`;
a "Claims" section with the README's claims and whether each holds. The probes here see independent prompts (the
harmful and harmless sets are separate lists, not item pairs), so no grouped split is needed.

Surface form (issue 21): the harmless prompts are matched to the harmful ones on surface form by default
(`interp.data.matched_pairs("both")`). The report gives how well the selected direction separates held-out
harmful from harmless prompts beside a surface-only baseline (length, trailing punctuation, final token), and
the same direction recomputed with trailing punctuation removed on both sides and from the original, confounded
harmless set. Candidates of zero norm (layer 0 at template tokens identical in every prompt) are undefined and
marked in the figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

import models
from experiments.common import (RefusalScore, Report, Study, chat_batch, chat_texts, instruction_splits, is_refusal,
                                lap, refusal_token_ids, safe_cosine, save_figure, surface_baseline, surface_table,
                                survives)
from experiments.lib.refusal_select import select_direction
from experiments.lib.refusal_stats import (PromptRefusalScores, as_dict, beats_null, cell_holds, check_stats_fields,
                                           primary_verdict, prompt_scores, random_like, rate_estimate)
from interp import probes, stats
from interp.directions import diff_of_means, score_directions
from interp.interventions import AddVector, directional_ablation
from interp.positions import PostInstruction, post_instruction_ids
from interp.readout import NextTokenLoss, run_readout
from interp.weights import orthogonalize
from models.errors import check_field

HARMLESS_STYLES = ("matched", "original", "harmbench", "strongreject")  # interp.data.harmless_instructions

# The cells the verdict scans (Holm over all of them), oriented so that the paper's direction is positive: the
# refusal-score drop on harmful test prompts under ablation, the rise on harmless ones under ActAdd +1.
CELLS = ("ablation vs null mean", "ActAdd vs null mean", "ablation vs null (percentile)", "ActAdd vs null (percentile)",
         "ablation: score drop", "ActAdd: score rise", "ablation: refusal-rate drop", "ActAdd: refusal-rate rise")

@dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"  # any local instruct model: registered name, .gguf or HF directory
    n_train: int = 64  # prompts per class for the difference of means
    n_val: int = 16  # prompts per class for scoring the candidates
    n_test: int = 32  # prompts per class for the final evaluation
    system_prompt: str = ""  # prepended as a system message ("" = none)
    kl_threshold: float = 0.1  # candidates whose ablation moves harmless KL more are filtered out
    max_layer_fraction: float = 0.8  # candidates only from layers below this fraction of the depth
    layer_stride: int = 1  # score every k-th layer's candidates (1 = all)
    max_new_tokens: int = 48  # greedy tokens per generation (refusal rates)
    sweep_batch: int = 16  # candidates per vmapped chunk (memory)
    seed: int = 0  # data splits and random controls
    harmless: str = "matched"  # harmless prompts: "matched" to the harmful ones on surface form, or "original" (confounded)
    n_null: int = 16  # random directions of the same norm in each null distribution
    primary: str = "ablation vs null mean"  # the verdict's comparison, one of CELLS (named before the run)
    out: str = "runs"  # reports go to OUT/<experiment>/<timestamp>/

    def __post_init__(self):
        check_stats_fields(self, CELLS)  # issue 39's fields
        for name in ("n_train", "n_val", "n_test", "layer_stride", "max_new_tokens", "sweep_batch"):
            check_field(name, getattr(self, name), lo=1, integer=True)
        check_field("seed", self.seed, lo=0, integer=True)
        check_field("kl_threshold", self.kl_threshold, lo=0, open_lo=True)
        check_field("max_layer_fraction", self.max_layer_fraction, lo=0, hi=1, open_lo=True)
        check_field("harmless", self.harmless, choices=HARMLESS_STYLES)


def surface_controls(m, cfg: Config, sel: dict, metric, harmful, harmless) -> dict:
    """The selected direction beside a surface-only baseline: AUROC of the held-out prompts' projection on it
    (`resid_pre` at the selected layer and position) vs `surface_baseline`; and the same difference of means
    recomputed with trailing punctuation removed on both sides and from the original harmless set: its cosine
    with the selected direction, its own projection AUROC, and its bypass / induce scores on the validation prompts."""
    system = cfg.system_prompt or None
    layer, pos = sel["layer"], sel["position"]
    variants = {f"{cfg.harmless} harmless": (harmful, harmless, np.asarray(sel["direction"]))}
    controls = {"punctuation normalised": (cfg.harmless, True)}
    if cfg.harmless != "original":
        controls["original harmless (confounded)"] = ("original", False)
    for label, (style, normalise) in controls.items():
        h, s = instruction_splits(cfg.seed, (cfg.n_train, cfg.n_val, cfg.n_test), harmless=style, normalise=normalise)
        d = diff_of_means(m, chat_batch(m, h[0], system), chat_batch(m, s[0], system), PostInstruction(), "resid_pre")
        variants[label] = (h, s, np.asarray(d[layer, pos]))
    dirs = np.stack([v[2] for v in variants.values()])
    harm_val, harmless_val = chat_batch(m, harmful[1], system), chat_batch(m, harmless[1], system)
    bypass, induce = score_directions(m, dirs, [layer] * len(dirs), metric, harm_val, harmless_val,
                                      batch_size=cfg.sweep_batch)
    out = {}
    for k, (label, (h, s, d)) in enumerate(variants.items()):
        acts = probes.collect(m, chat_texts(m, h[2] + s[2], system), PostInstruction(), site="resid_pre")
        proj = np.asarray(acts[layer, :, pos], np.float64) @ (d / np.linalg.norm(d))
        y = np.r_[np.ones(len(h[2])), np.zeros(len(s[2]))]
        surf = surface_baseline(h[0], s[0], h[2], s[2])
        out[label] = dict(cosine_with_selected=float(safe_cosine(d, dirs[0])), test_auroc=float(probes.auroc(proj, y)),
                          test_auroc_ci=as_dict(stats.auroc(proj, y, seed=cfg.seed)),
                          test_surface_auroc=surf["auroc"], test_surface_accuracy=surf["accuracy"],
                          bypass=float(bypass[k]), induce=float(induce[k]))
    return out


def evaluate(m, cfg: Config, harmful_test, harmless_test, direction, layer, rand, pmetric):
    """Per condition: greedy refusal flags `[n]` and per-prompt refusal scores `[n]` on the harmful and harmless
    test prompts, and CE on harmless text; `rand` is the null's first random direction (the only one generated)."""
    system = cfg.system_prompt or None
    harm, harmless = chat_batch(m, harmful_test, system), chat_batch(m, harmless_test, system)
    ortho = orthogonalize(m, direction)
    conditions = {  # name -> (model, interventions on harmful, interventions on harmless)
        "base": (m, (), ()),
        "ablation (hooks)": (m, directional_ablation(direction), directional_ablation(direction)),
        "ablation (orthogonalised weights)": (ortho, (), ()),
        "ActAdd +1 / -1": (m, (AddVector("resid_pre", direction, -1.0, layers=(layer,)),),
                           (AddVector("resid_pre", direction, 1.0, layers=(layer,)),)),
        "random direction (null draw 0) ablation / ActAdd +1": (m, directional_ablation(rand),
                                                                (AddVector("resid_pre", rand, 1.0, layers=(layer,)),)),
    }
    texts = [m.apply_chat_template(([{"role": "system", "content": system}] if system else [])
                                   + [{"role": "user", "content": p}]) for p in harmful_test + harmless_test]
    base_replies = models.generate(m, texts[len(harmful_test):], max_new_tokens=cfg.max_new_tokens)
    ce_tokens, ce_mask = m.tokenize([t + r for t, r in zip(texts[len(harmful_test):], base_replies)])
    per, generations = {}, {}
    for name, (model, on_harm, on_harmless) in conditions.items():
        gen_harm = models.generate(model, texts[: len(harmful_test)], max_new_tokens=cfg.max_new_tokens, interventions=on_harm)
        gen_harmless = models.generate(model, texts[len(harmful_test):], max_new_tokens=cfg.max_new_tokens,
                                       interventions=on_harmless)
        ce = float(NextTokenLoss(ce_tokens, ce_mask)(run_readout(model, jnp.asarray(ce_tokens), jnp.asarray(ce_mask), on_harmless,
                                                             positions=None)))
        per[name] = dict(refused_harmful=np.array([is_refusal(t) for t in gen_harm]),
                         refused_harmless=np.array([is_refusal(t) for t in gen_harmless]),
                         score_harmful=prompt_scores(model, *harm, pmetric, on_harm),
                         score_harmless=prompt_scores(model, *harmless, pmetric, on_harmless), ce_harmless=ce)
        generations[name] = {"harmful": gen_harm[:3], "harmless": gen_harmless[:3]}
    hook = run_readout(m, *map(jnp.asarray, harm), directional_ablation(direction), positions=None).logits
    weights = run_readout(ortho, *map(jnp.asarray, harm), positions=None).logits
    max_diff = float(jnp.abs(hook - weights)[jnp.asarray(harm[1]) > 0].max())
    return per, generations, max_diff


def null_scores(m, cfg: Config, direction, layer: int, nulls, pmetric, harm, harmless) -> dict:
    """Per-prompt refusal scores with the real direction (row 0) and each null direction (rows 1..K) ablated on the
    harmful prompts `[K + 1, n]` and added (+1 at `layer`) on the harmless ones, as one stacked sweep each."""
    dirs = jnp.asarray(np.concatenate([np.asarray(direction, np.float32)[None], nulls]))
    abl, add = score_directions(m, dirs, [layer] * len(dirs), pmetric, harm, harmless, batch_size=cfg.sweep_batch)
    return dict(ablated=np.asarray(abl), added=np.asarray(add), base_harmful=prompt_scores(m, *harm, pmetric),
                base_harmless=prompt_scores(m, *harmless, pmetric))


def stat_tests(per: dict, null: dict) -> dict:
    """The cells in `CELLS`, oriented so that the paper's direction (ablation lowers refusal on harmful prompts,
    ActAdd raises it on harmless ones) is positive."""
    base, abl = per["base"], per["ablation (hooks)"]
    act = per["ActAdd +1 / -1"]
    drop = null["base_harmful"][None] - null["ablated"]  # [K + 1, n]
    rise = null["added"] - null["base_harmless"][None]
    g = dict(alternative="greater")
    return {
        "ablation vs null mean": stats.paired_difference(drop[0], drop[1:].mean(0), **g),
        "ActAdd vs null mean": stats.paired_difference(rise[0], rise[1:].mean(0), **g),
        "ablation vs null (percentile)": stats.null_test(float(drop[0].mean()), drop[1:].mean(1), "greater"),
        "ActAdd vs null (percentile)": stats.null_test(float(rise[0].mean()), rise[1:].mean(1), "greater"),
        "ablation: score drop": stats.paired_difference(base["score_harmful"], abl["score_harmful"], **g),
        "ActAdd: score rise": stats.paired_difference(act["score_harmless"], base["score_harmless"], **g),
        "ablation: refusal-rate drop": stats.paired_rate_difference(base["refused_harmful"], abl["refused_harmful"]),
        "ActAdd: refusal-rate rise": stats.paired_rate_difference(act["refused_harmless"], base["refused_harmless"]),
    }


def _auc(c: dict) -> str:
    """A surface-control row's projection AUROC with its bootstrap interval."""
    return str(stats.Estimate(**{k: c["test_auroc_ci"][k] for k in ("value", "lo", "hi", "n")}))


def _figures(out, sel, rows, tokens_post):
    fig = Figure(figsize=(15, 4.5))
    for i, (key, title) in enumerate([("bypass", "refusal score, direction ablated (harmful)"),
                                      ("induce", "refusal score, direction added (harmless)"),
                                      ("kl", "KL on harmless under ablation")]):
        ax = fig.add_subplot(1, 3, i + 1)
        im = ax.imshow(np.where(sel["undefined"], np.nan, sel[key]), aspect="auto", cmap="viridis")
        ax.imshow(np.where(sel["undefined"], 1.0, np.nan), aspect="auto", cmap=ListedColormap(["lightgrey"]))
        ax.set(title=title + ("\n(grey: zero-norm candidate, undefined)" if sel["undefined"].any() else ""),
               xlabel="post-instruction position", ylabel="layer")
        ax.set_yticks(range(len(sel["layers"])), [str(l) for l in sel["layers"]], fontsize=6)
        ax.set_xticks(range(len(tokens_post)), tokens_post, rotation=60, fontsize=7)
        fig.colorbar(im, ax=ax)
    save_figure(fig, out / "candidates.png")
    fig = Figure(figsize=(9, 4))
    ax = fig.add_subplot()
    names = list(rows)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [rows[n]["refusal_score_harmful"] for n in names], 0.4, label="harmful")
    ax.bar(x + 0.2, [rows[n]["refusal_score_harmless"] for n in names], 0.4, label="harmless")
    ax.set_xticks(x, names, rotation=15, fontsize=7)
    ax.set(ylabel="refusal score (log-odds)", title="refusal score per condition (test prompts)")
    ax.legend()
    save_figure(fig, out / "refusal_scores.png")


def study(m, cfg: Config, out) -> Report:
    """The whole study on model `m` (figures into the folder `out`)."""
    metric = RefusalScore(jnp.asarray(refusal_token_ids(m)))
    pmetric = PromptRefusalScores(jnp.asarray(refusal_token_ids(m)))
    harmful, harmless = instruction_splits(cfg.seed, (cfg.n_train, cfg.n_val, cfg.n_test), harmless=cfg.harmless)
    sel = select_direction(m, cfg, harmful, harmless, metric)
    lap("candidate selection")
    controls = surface_controls(m, cfg, sel, metric, harmful, harmless)
    lap("surface controls")
    nulls = random_like(sel["direction"], cfg.n_null, cfg.seed)  # [K, D], the same norm as the direction
    system = cfg.system_prompt or None
    null = null_scores(m, cfg, sel["direction"], sel["layer"], nulls, pmetric, chat_batch(m, harmful[2], system),
                       chat_batch(m, harmless[2], system))
    lap("null distributions")
    per, generations, max_diff = evaluate(m, cfg, harmful[2], harmless[2], sel["direction"], sel["layer"], nulls[0],
                                          pmetric)
    lap("test conditions")
    rows = {n: dict(refusal_rate_harmful=float(r["refused_harmful"].mean()),
                    refusal_rate_harmless=float(r["refused_harmless"].mean()),
                    refusal_score_harmful=float(r["score_harmful"].mean()),
                    refusal_score_harmless=float(r["score_harmless"].mean()), ce_harmless=r["ce_harmless"])
            for n, r in per.items()}
    post = [m.decode([t], skip_special=False) for t in post_instruction_ids(m)]
    _figures(out, sel, rows, post)
    tests = stat_tests(per, null)
    v = stats.verdict(tests, cfg.primary, alternative="greater", what=cfg.primary)
    holds, verdict_text = primary_verdict(v, tests)  # with the null's percentile where the primary is a null cell
    effect = cell_holds(v, tests, "ablation: refusal-rate drop") or cell_holds(v, tests, "ActAdd: refusal-rate rise")
    ci = lambda x: stats.bootstrap(x, seed=cfg.seed)
    table = stats.markdown_table(
        ["condition", "refusal rate harmful", "refusal rate harmless", "refusal score harmful", "refusal score harmless",
         "CE harmless"],
        [[n, str(rate_estimate(r["refused_harmful"])), str(rate_estimate(r["refused_harmless"])),
          str(ci(r["score_harmful"])), str(ci(r["score_harmless"])), f"{r['ce_harmless']:.3f}"] for n, r in per.items()])
    verdict = ("The intervention changes a refusal rate (paired, McNemar, Holm-corrected): see the verdict table."
               if effect else
               "**No detectable behavioural effect:** neither the harmful refusal rate under ablation nor the harmless "
               "one under ActAdd changes significantly (paired, exact McNemar, Holm-corrected; intervals in the "
               "verdict table); the refusal-score changes are the representational effect.")
    null_rows = [[k, str(tests[k])] for k in ("ablation vs null (percentile)", "ActAdd vs null (percentile)")]
    null_text = (f"{cfg.n_null} random directions of the selected direction's norm (seed {cfg.seed}), each ablated "
                 f"on the {len(harmful[2])} harmful test prompts and added (+1 at layer {sel['layer']}) on the "
                 f"{len(harmless[2])} harmless ones, in one stacked sweep each with the real direction; effects are "
                 "mean per-prompt refusal-score changes (drop on harmful, rise on harmless). The real effect's "
                 "percentile in the null and the null's 5-95% band:\n\n"
                 + stats.markdown_table(["effect", "real vs null"], null_rows)
                 + f"\n\nWith K = {cfg.n_null} draws a null test's p cannot go below 1/(K+1) = "
                 f"{1 / (cfg.n_null + 1):.3f}; the paired cells compare each prompt's real effect with the null's mean "
                 "effect on that prompt.")
    c_table = stats.markdown_table(
        ["direction from", "cosine with selected", "projection AUROC (test)", "surface baseline AUROC (test)",
         "bypass (val)", "induce (val)"],
        [[k, f"{c['cosine_with_selected']:.3f}", _auc(c), f"{c['test_surface_auroc']:.3f}", f"{c['bypass']:.2f}",
          f"{c['induce']:.2f}"] for k, c in controls.items()])
    main_c, norm_c = controls[f"{cfg.harmless} harmless"], controls["punctuation normalised"]
    ok, survive_text = survives("Projection on the selected direction (held-out prompts)", main_c["test_auroc"],
                                norm_c["test_auroc"], main_c["test_surface_auroc"], norm_c["test_surface_auroc"])
    auc = lambda c: f"{_auc(c)} vs surface {c['test_surface_auroc']:.3f}"
    claims = [
        stats.Claim("Ablating the selected direction lowers harmful prompts' refusal score more than random directions "
                    "of the same norm (primary)", str(tests["ablation vs null mean"]) + "; "
                    + str(tests["ablation vs null (percentile)"]),
                    beats_null(v, tests, "ablation vs null mean", "ablation vs null (percentile)")),
        stats.Claim("Adding the direction raises harmless prompts' refusal score more than random directions of the "
                    "same norm", str(tests["ActAdd vs null mean"]) + "; " + str(tests["ActAdd vs null (percentile)"]),
                    beats_null(v, tests, "ActAdd vs null mean", "ActAdd vs null (percentile)")),
        stats.Claim("No behavioural effect: ablation does not detectably change the harmful refusal rate, nor ActAdd "
                    "the harmless one (paired, McNemar, Holm)", str(tests["ablation: refusal-rate drop"]) + "; "
                    + str(tests["ActAdd: refusal-rate rise"]), not effect),
        stats.Claim("The direction does not survive the surface controls (projection AUROC within 0.05 of a "
                    "surface-only baseline, matched or punctuation-normalised)",
                    f"matched {auc(main_c)}; normalised {auc(norm_c)}", not ok),
        stats.Claim("Hook ablation and orthogonalised weights agree (largest absolute logit difference < 1e-3)",
                    f"{max_diff:.1e} over {len(harmful[2])} harmful prompts' tokens", max_diff < 1e-3),
    ]
    sections = [
        ("Data", f"n = {len(harmful[0])}/{len(harmful[1])}/{len(harmful[2])} harmful (HarmBench + StrongREJECT) and "
                 f"{len(harmless[0])}/{len(harmless[1])}/{len(harmless[2])} harmless ({cfg.harmless} set) train/val/test "
                 f"prompts, seed {cfg.seed}, system prompt: {cfg.system_prompt or '(model default)'}. Surface form "
                 "(`interp.data.surface_stats`):\n\n" + surface_table({"train harmful": harmful[0],
                                                                      "train harmless": harmless[0]})),
        ("Selection", f"{sel['bypass'].size} candidates (layers {[int(l) for l in sel['layers']]} x {len(post)} post-instruction "
                      f"positions {post}) scored in vmapped sweeps. Baseline refusal score on validation: harmful "
                      f"{sel['base_harmful']:.2f}, harmless {sel['base_harmless']:.2f}. {sel['n_pass']} candidates "
                      f"pass the filters (layer < {cfg.max_layer_fraction} L, KL < {cfg.kl_threshold}, induce > harmless "
                      f"baseline){'; none did, so the filter was relaxed to the layer limit only' if sel['relaxed'] else ''}. "
                      f"Selected: layer {sel['layer']}, position {sel['position']} ({post[sel['position']]!r}), bypass "
                      f"{sel['bypass'].ravel()[sel['index']]:.2f}, induce {sel['induce'].ravel()[sel['index']]:.2f}, "
                      f"KL {sel['kl'].ravel()[sel['index']]:.3f}. {int(sel['undefined'].sum())} candidates have zero "
                      "norm (the same token in every prompt at layer 0): undefined, excluded, grey in the figure."
                      "\n\n![candidates](candidates.png)"),
        ("Surface controls", "The selected direction's separation of held-out harmful and harmless prompts beside a "
                             "surface-only baseline (logistic regression on length, trailing punctuation and final "
                             "token; the projection AUROC with a bootstrap 95% interval over the test prompts), and "
                             "the same difference of means (same layer and position) recomputed with "
                             "trailing punctuation removed on both sides and from the original harmless set; bypass / "
                             "induce are scored on the same validation prompts for every row.\n\n" + c_table +
                             f"\n\n{survive_text}"),
        ("Test results", table + f"\n\nHook ablation vs orthogonalised weights: max |logit difference| {max_diff:.2e}. "
                         "The ActAdd row subtracts the direction on harmful prompts and adds it on harmless ones; the "
                         "random row uses the null's first random direction of the same norm (ablation on harmful, +1 on "
                         "harmless; the whole null is in the next section). "
                         f"CE is on the base model's own greedy replies to the harmless test prompts. Rates: Wilson "
                         f"95% intervals; scores: mean with a bootstrap 95% interval over prompts.\n\n{verdict}\n\n"
                         "![refusal scores](refusal_scores.png)"),
        ("Null distributions", null_text),
        ("Verdict", verdict_text + "\n\n" + v.table),
        ("Claims", stats.claims_section(claims)),
        ("Sample generations", "\n".join(f"- **{n}**, harmful: {g['harmful'][:1]}; harmless: {g['harmless'][:1]}"
                                        for n, g in generations.items())),
    ]
    metrics = dict(selected=dict(layer=sel["layer"], position=sel["position"], n_pass=sel["n_pass"], relaxed=sel["relaxed"],
                                 n_undefined=int(sel["undefined"].sum())),
                   conditions=rows, hook_vs_weights_max_logit_diff=max_diff, behavioural_effect=bool(effect),
                   surface_controls=controls, direction_survives=bool(ok),
                   tests={k: as_dict(t) for k, t in tests.items()}, primary=cfg.primary, verdict_holds=holds,
                   p_holm=v.p_holm, claims=[dict(text=c.text, statistic=c.statistic, holds=c.holds) for c in claims])
    return Report(sections, metrics)


STUDY = Study("refusal_direction", "Refusal direction (Arditi et al. 2024)", Config, study, __doc__)


def main(argv=None, cfg: Config | None = None):
    """`python -m experiments.refusal_direction`: the run folder and its metrics."""
    return STUDY.main(argv, cfg)


if __name__ == "__main__":
    main()
