"""Refusal falls off a cliff (Yin et al. 2025), reproduced with interp's transforms.

    python -m experiments.refusal_cliff [--model NAME_OR_DIR] [--probe-layer 20] [--system-prompt "..."]

A logistic probe is trained at one layer on harmful vs harmless prompts at t_inst (the last instruction token).
It probes harmfulness, not refusal intention: the paper labels refusal intention from refused vs complied
prompts, which a model that rarely refuses cannot supply. The probe then scores every token of prompt +
greedy response of held-out prompts; trajectories are tail-aligned to the end of the prompt and resampled to
`n_points`, and the report gives the drop from the instruction plateau to the final template tokens (the
"cliff"). Each head's contribution `c_h = sum over prompts of (head output at the last prompt token) . r`
(r the probe's unit direction, heads at layers <= the probe layer) comes from one forward; the top 1% / 3% most
negative heads are zero-ablated, against a null distribution of `n_null` sets of as many random eligible heads,
all conditions in one vmapped program, measuring the probe logit and the refusal score of each prompt at its last
token.

Surface form (issue 21): the harmless prompts are matched to the harmful ones on surface form by default
(`interp.data.matched_pairs("both")`); the probe's accuracy is reported beside a surface-only baseline (length,
trailing punctuation, final token), and the probe and the prompt trajectories are rerun with trailing punctuation
removed on both sides and on the original, confounded harmless set (prompt tokens only, no generation).

Statistics (issue 39, `interp.stats`): the drop (plateau - last prompt token) per prompt with a bootstrap interval,
harmful vs harmless drops as an independent-samples difference (bootstrap interval, permutation p), the probe's
held-out AUROC with a bootstrap interval over prompts, refusal rates with Wilson intervals, and each top-heads
ablation against its random-heads null: per prompt as a paired difference from the null's mean, and as the
percentile of the mean effect in the null with the null's 5-95% band. The verdict is computed on the `primary` cell
named in the config, Holm-corrected over every cell of `cells(fractions)`; a "Claims" section lists the README's
claims. The probe sees independent prompts (the harmful and harmless sets are separate lists, not item pairs), so
no grouped split is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

import models
from experiments.common import (Report, Study, chat_batch, chat_texts, instruction_splits, is_refusal, lap,
                                refusal_rate, refusal_token_ids, save_figure, surface_baseline, surface_table, survives)
from experiments.lib.refusal_stats import (PromptRefusalScores, as_dict, beats_null, cell_holds, check_stats_fields,
                                           primary_verdict,
                                           rate_estimate)
from interp import probes, stats
from interp.interventions import ScaleHeads
from interp.plot import heatmap
from interp.positions import LastInstruction, post_instruction_ids
from interp.readout import Readout
from models import transformer
from models.transformer import Capture
from models.errors import check_field

HARMLESS_STYLES = ("matched", "original", "harmbench", "strongreject")  # interp.data.harmless_instructions


def cells(fractions) -> tuple[str, ...]:
    """The cells the verdict scans (Holm over all of them), oriented so that the paper's direction is positive: the
    cliff itself (the harmful drop, plateau - last prompt token), its specificity (harmful drop - harmless drop:
    positive also when both *rise* and harmful rises less, so it is no cliff on its own), and for each ablated
    fraction the top heads' rise of the probe logit and of the refusal score on harmful prompts against the
    random-heads null."""
    out = ["cliff: harmful drop", "specificity: harmful - harmless drop"]
    for f in fractions:
        out += [f"top {f:.0%} heads vs null mean: probe logit", f"top {f:.0%} heads vs null (percentile): probe logit",
                f"top {f:.0%} heads vs null mean: refusal score"]
    return tuple(out)


@dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"  # any local instruct model: registered name, .gguf or HF directory
    n_train: int = 96  # probe training prompts per class (harmful, harmless)
    n_test: int = 32  # test prompts per class
    probe_layer: int = -1  # layer of the probe; -1: two thirds of the depth
    system_prompt: str = ""  # prepended as a system message ("" = none)
    max_new_tokens: int = 48  # greedy response tokens scored by the probe
    n_points: int = 100  # points each trajectory is resampled to
    plateau_tokens: int = 5  # instruction tokens (ending at t_inst) averaged for the plateau
    final_tokens: int = 1  # last prompt tokens averaged for the end of the cliff (1: where the reply starts)
    fractions: tuple[float, ...] = (0.01, 0.03)  # fractions of the eligible heads ablated
    n_null: int = 16  # random-head sets per fraction in each null distribution
    batch_size: int = 16  # prompts per forward
    seed: int = 0  # data splits and random controls
    harmless: str = "matched"  # harmless prompts: "matched" to the harmful ones on surface form, or "original" (confounded)
    primary: str = "cliff: harmful drop"  # the verdict's comparison, one of cells(fractions), named before the run
    out: str = "runs"  # reports go to OUT/<experiment>/<timestamp>/

    def __post_init__(self):
        for name, lo in (("n_train", 4), ("n_test", 1), ("max_new_tokens", 1), ("n_points", 2), ("plateau_tokens", 1),
                         ("final_tokens", 1), ("batch_size", 1), ("seed", 0)):
            check_field(name, getattr(self, name), lo=lo, integer=True)
        check_field("probe_layer", self.probe_layer, lo=-1, integer=True)  # its upper bound once the model is loaded
        check_field("fractions", self.fractions, lo=0, hi=1, open_lo=True, each=True)
        check_field("harmless", self.harmless, choices=HARMLESS_STYLES)
        check_stats_fields(self, cells(self.fractions))  # issue 39's fields


def train_probe(m, cfg: Config, layer: int, harmful, harmless) -> tuple[probes.Probes, dict]:
    """A logistic probe at `layer`, t_inst, on `resid_post`; its held-out metrics from the probe's own split."""
    texts = chat_texts(m, harmful + harmless, cfg.system_prompt or None)
    acts = probes.collect(m, texts, LastInstruction(), site="resid_post", batch_size=cfg.batch_size)[layer:layer + 1]
    y = np.r_[np.ones(len(harmful)), np.zeros(len(harmless))]
    grid = probes.train(acts, y, seed=cfg.seed, layers=[layer], positions=["t_inst"], model=cfg.model)
    tr, _, te = probes.split_indices(y, seed=cfg.seed)  # the split `probes.train` used
    texts_of = lambda idx, label: [(harmful + harmless)[i] for i in idx if y[i] == label]
    surface = surface_baseline(texts_of(tr, 1), texts_of(tr, 0), texts_of(te, 1), texts_of(te, 0))
    return grid.probes.cell(0, 0), dict(grid.best_metrics("test"), surface_accuracy=surface["accuracy"],
                                        surface_auroc=surface["auroc"])


def trajectories(m, cfg: Config, probe, prompts, generate: bool = True) -> dict:
    """Probe P(harmful) on every token of prompt + greedy response (`generate=False`: the prompt only); prompt-only
    views tail-aligned at its end; `t_inst` the score at the last instruction token."""
    system = cfg.system_prompt or None
    texts = chat_texts(m, prompts, system)
    replies = models.generate(m, texts, cfg.max_new_tokens) if generate else [""] * len(texts)
    scores, mask = probes.trajectory(probe, m, [t + r for t, r in zip(texts, replies)], batch_size=cfg.batch_size)
    n_prompt = m.tokenize(texts)[1].sum(1)
    rows = [s[k > 0] for s, k in zip(scores, mask)]  # real tokens of each row, in order
    prompt_rows = [r[:n] for r, n in zip(rows, n_prompt)]
    reply_rows = [r[n:] for r, n in zip(rows, n_prompt)]
    n_post = len(post_instruction_ids(m))
    as_scores = lambda rs: (_pad(rs), _pad([np.ones_like(r) for r in rs]))
    resampled = probes.resample(*as_scores(prompt_rows), n_points=cfg.n_points)
    tail = probes.tail_align(*as_scores(prompt_rows), length=n_post + 1 + cfg.plateau_tokens + 10)
    plateau = np.array([r[-n_post - cfg.plateau_tokens:-n_post].mean() for r in prompt_rows])
    final = np.array([r[-cfg.final_tokens:].mean() for r in prompt_rows])
    template = np.stack([r[-n_post:] for r in prompt_rows])  # [B, n_post]
    reply = np.array([r.mean() if len(r) else np.nan for r in reply_rows])
    t_inst = np.array([r[-n_post - 1] for r in prompt_rows])
    return dict(resampled=resampled, tail=tail, plateau=plateau, final=final, template=template, reply=reply,
                t_inst=t_inst, replies=replies, refusal_rate=refusal_rate(replies) if generate else float("nan"),
                refused=np.array([is_refusal(r) for r in replies]) if generate else None)


def _pad(rows) -> np.ndarray:
    """Left-pad ragged rows into a `[B, T]` array (the layout `probes.trajectory` returns)."""
    T = max(len(r) for r in rows)
    out = np.zeros((len(rows), T))
    for i, r in enumerate(rows):
        out[i, T - len(r):] = r
    return out


def head_contributions(m, tokens, mask, direction, layer: int) -> np.ndarray:
    """`c[l, h] = sum_b head_out[l, b, last, h] . direction`, `[L, H]` from one forward (NaN above `layer`)."""
    _, acts = models.forward(m, jnp.asarray(tokens), attention_mask=jnp.asarray(mask),
                             capture=(Capture("attn.head_out", positions=(-1,)),))
    c = np.asarray(jnp.einsum("lbthd,d->lh", acts["attn.head_out"], jnp.asarray(direction)), np.float64)
    c[layer + 1:] = np.nan
    return c


@eqx.filter_jit
def _ablation_scores(model, tokens, mask, head_masks, probe_arrays, metric, layer: int):
    """Probe logit (last token, `resid_post` at `layer`) and refusal score (a per-prompt metric) of each prompt
    for each `[L, H]` head scale mask, vmapped: `([N, B], [N, B])`. `probe_arrays` = (w, b, mean, scale)."""
    probe = probes.Probes(*probe_arrays)
    L = model.cfg.n_layers

    def one(hm):
        capture = (Capture("resid_post", layers=(layer, L - 1), positions=(-1,)), Capture("final_norm", positions=(-1,)))
        _, acts = models.forward(model, tokens, mask, None, capture, (ScaleHeads(hm),))
        resid = acts["resid_post"]  # [2, B, 1, D]: the probe's layer and the last layer
        r = Readout(transformer.unembed(model.params, acts["final_norm"], model.cfg), resid[1])
        return probe.logits(resid[0, :, 0]), metric(r)

    return jax.vmap(one)(head_masks)


def head_ablations(m, cfg: Config, contrib: np.ndarray, probe, tokens, mask, metric) -> dict:
    """Zero-ablate the most negative heads (each fraction) and `n_null` sets of as many random eligible heads, one
    vmapped program; `metric` is per prompt. Returns the batch means per condition (`rows`), the per-prompt values
    (`per`: name -> `{"probe_logit": [B], "refusal_score": [B]}`) and the heads' order."""
    L, H = contrib.shape
    eligible = np.flatnonzero(np.isfinite(contrib.ravel()))
    order = eligible[np.argsort(contrib.ravel()[eligible])]  # most negative first
    rng = np.random.default_rng(cfg.seed)
    conditions = {"base": np.ones(L * H)}
    for f in cfg.fractions:
        k = max(1, int(np.ceil(f * len(eligible))))
        top = np.ones(L * H)
        top[order[:k]] = 0
        conditions[f"top {f:.0%} ({k} heads)"] = top
        for s in range(cfg.n_null):
            r = np.ones(L * H)
            r[rng.choice(eligible, k, replace=False)] = 0
            conditions[f"random {f:.0%} draw {s}"] = r
    names = list(conditions)
    masks = jnp.asarray(np.stack([conditions[n] for n in names]).reshape(-1, L, H), jnp.float32)
    arrays = tuple(jnp.asarray(a, jnp.float32) for a in (probe.w, probe.b, probe.mean, probe.scale))
    # one compiled program, called on chunks of `batch_size` masks (the last padded): memory stays bounded as n_null grows
    n, size = len(names), max(1, min(cfg.batch_size, len(names)))
    parts = []
    for lo in range(0, n, size):
        idx = np.minimum(np.arange(lo, lo + size), n - 1)
        out = _ablation_scores(m, jnp.asarray(tokens), jnp.asarray(mask), masks[idx], arrays, metric, int(probe.layers[0]))
        parts.append(np.asarray(out, np.float64)[:, : min(size, n - lo)])  # [2, chunk, B]
    z, ref = np.concatenate(parts, 1)  # [N, B] each
    rows = {n: dict(probe_logit=float(a.mean()), refusal_score=float(b.mean())) for n, a, b in zip(names, z, ref)}
    per = {n: dict(probe_logit=a, refusal_score=b) for n, a, b in zip(names, z, ref)}
    return dict(rows=rows, per=per, order=order)


def _summarise(per: dict, fractions) -> dict:
    """For each fraction and quantity: the top heads' change from base (per prompt) against the random-heads null:
    `top` (mean change), `null` (`[K]` mean changes), and the tests (paired vs the null's mean; percentile)."""
    base = per["base"]
    out = {}
    for f in fractions:
        top = next(n for n in per if n.startswith(f"top {f:.0%} "))
        rand = [v for n, v in per.items() if n.startswith(f"random {f:.0%} ")]
        out[top] = {}
        for key in ("probe_logit", "refusal_score"):
            d_top = per[top][key] - base[key]  # [B]
            d_null = np.stack([r[key] - base[key] for r in rand])  # [K, B]
            out[top][key] = dict(top=float(d_top.mean()), null=d_null.mean(1),
                                 vs_mean=stats.paired_difference(d_top, d_null.mean(0), alternative="greater"),
                                 vs_null=stats.null_test(float(d_top.mean()), d_null.mean(1), "greater"))
    return out


def cliff_tests(traj: dict, summary: dict, fractions) -> dict:
    """The cells of `cells(fractions)`."""
    h, s = traj["harmful"], traj["harmless"]
    tests = {"specificity: harmful - harmless drop": stats.mean_difference(h["plateau"] - h["final"], s["plateau"] - s["final"],
                                                                     alternative="greater"),
             "cliff: harmful drop": stats.paired_difference(h["plateau"], h["final"], alternative="greater")}
    for f, (name, v) in zip(fractions, summary.items()):
        tests[f"top {f:.0%} heads vs null mean: probe logit"] = v["probe_logit"]["vs_mean"]
        tests[f"top {f:.0%} heads vs null (percentile): probe logit"] = v["probe_logit"]["vs_null"]
        tests[f"top {f:.0%} heads vs null mean: refusal score"] = v["refusal_score"]["vs_mean"]
    return tests


def _figures(out, traj: dict, contrib: np.ndarray, post_labels, cfg: Config):
    fig = Figure(figsize=(12, 4))
    ax = fig.add_subplot(1, 2, 1)
    x = np.linspace(0, 1, cfg.n_points)
    for name, t in traj.items():
        mu, sd = np.nanmean(t["resampled"], 0), np.nanstd(t["resampled"], 0)
        half = 1.96 * sd / np.sqrt(len(t["resampled"]))
        ax.plot(x, mu, label=name)
        ax.fill_between(x, mu - half, mu + half, alpha=0.25)
    ax.set(xlabel="position in the prompt (resampled, 1 = last prompt token)", ylabel="probe P(harmful)",
           title="probe score along the prompt (95% CI)", ylim=(-0.02, 1.02))
    ax.legend()
    ax = fig.add_subplot(1, 2, 2)
    for name, t in traj.items():
        n = t["tail"].shape[1]
        mu = np.nanmean(t["tail"], 0)
        half = 1.96 * np.nanstd(t["tail"], 0) / np.sqrt(np.maximum(np.sum(~np.isnan(t["tail"]), 0), 1))
        ax.plot(np.arange(-n + 1, 1), mu, marker="o", ms=3, label=name)
        ax.fill_between(np.arange(-n + 1, 1), mu - half, mu + half, alpha=0.25)
    k = len(post_labels)
    ax.axvspan(-k + 0.5, 0.5, color="grey", alpha=0.15)
    ax.set_xticks(range(-k + 1, 1), post_labels, rotation=60, ha="right", fontsize=7)
    ax.set(xlabel="last prompt tokens (shaded: post-instruction template)", ylabel="probe P(harmful)",
           title="the last tokens, tail-aligned", ylim=(-0.02, 1.02))
    save_figure(fig, out / "trajectory.png")

    fig = heatmap(contrib, title="head contribution to the probe direction (last prompt token; grey: above the "
                                 "probe layer, not defined)")
    fig.axes[0].imshow(np.where(np.isnan(contrib), 1.0, np.nan), cmap=ListedColormap(["lightgrey"]), aspect="auto",
                       interpolation="nearest")
    save_figure(fig, out / "head_contributions.png")


def _surface_variant(probe_metrics: dict, traj: dict, harmful, harmless) -> dict:
    """Probe vs surface baseline on its own split and on the held-out test prompts (t_inst), and the cliff."""
    h, s = traj["harmful"], traj["harmless"]
    y = np.r_[np.ones(len(h["t_inst"])), np.zeros(len(s["t_inst"]))]
    surface = surface_baseline(harmful[0], harmless[0], harmful[2], harmless[2])
    scores = np.r_[h["t_inst"], s["t_inst"]]
    return dict(probe_auroc=probe_metrics["auroc"], probe_surface_auroc=probe_metrics["surface_auroc"],
                test_auroc=float(probes.auroc(scores, y)), test_surface_auroc=surface["auroc"],
                test_auroc_ci=as_dict(stats.auroc(scores, y)),
                drop_harmful_ci=as_dict(stats.paired_difference(h["plateau"], h["final"])),
                drop_harmless_ci=as_dict(stats.paired_difference(s["plateau"], s["final"])),
                plateau_harmful=float(h["plateau"].mean()), final_harmful=float(h["final"].mean()),
                drop_harmful=float(np.mean(h["plateau"] - h["final"])),
                drop_harmless=float(np.mean(s["plateau"] - s["final"])))


def _est(d: dict) -> str:
    """An `as_dict` estimate back as its report string."""
    return str(stats.Estimate(**{k: d[k] for k in ("value", "lo", "hi", "n")}))


def study(m, cfg: Config, out) -> Report:
    """The whole study on model `m` (figures into the folder `out`)."""
    L = m.cfg.n_layers
    check_field("probe_layer", cfg.probe_layer, lo=-1, hi=L - 1, integer=True)  # before any compute
    layer = cfg.probe_layer if cfg.probe_layer >= 0 else (2 * L) // 3
    metric = PromptRefusalScores(jnp.asarray(refusal_token_ids(m)))
    harmful, harmless = instruction_splits(cfg.seed, (cfg.n_train, 0, cfg.n_test), harmless=cfg.harmless)
    probe, probe_metrics = train_probe(m, cfg, layer, harmful[0], harmless[0])
    traj = {"harmful": trajectories(m, cfg, probe, harmful[2]), "harmless": trajectories(m, cfg, probe, harmless[2])}
    lap("probe and trajectories")
    variants = {f"{cfg.harmless} harmless": _surface_variant(probe_metrics, traj, harmful, harmless)}
    # controls, prompt tokens only: punctuation removed on both sides; the original (confounded) harmless set
    controls = {"punctuation normalised": (cfg.harmless, True)}
    if cfg.harmless != "original":
        controls["original harmless (confounded)"] = ("original", False)
    for label, (style, normalise) in controls.items():
        h2, s2 = instruction_splits(cfg.seed, (cfg.n_train, 0, cfg.n_test), harmless=style, normalise=normalise)
        p2, pm2 = train_probe(m, cfg, layer, h2[0], s2[0])
        t2 = {"harmful": trajectories(m, cfg, p2, h2[2], generate=False),
              "harmless": trajectories(m, cfg, p2, s2[2], generate=False)}
        variants[label] = _surface_variant(pm2, t2, h2, s2)
    lap("surface controls")
    tokens, mask = chat_batch(m, harmful[2], cfg.system_prompt or None)
    contrib = head_contributions(m, tokens, mask, probe.direction, layer)
    abl = head_ablations(m, cfg, contrib, probe, tokens, mask, metric)
    lap("head ablations")
    summary = _summarise(abl["per"], cfg.fractions)
    post_labels = [repr(m.decode([t], skip_special=False))[1:-1].replace("|", "¦") for t in post_instruction_ids(m)]
    _figures(out, traj, contrib, post_labels, cfg)

    h, s = traj["harmful"], traj["harmless"]
    drop = float(np.mean(h["plateau"] - h["final"]))
    drop_harmless = float(np.mean(s["plateau"] - s["final"]))
    cliff = drop >= 0.1 and drop - drop_harmless >= 0.1
    tests = cliff_tests(traj, summary, cfg.fractions)
    v = stats.verdict(tests, cfg.primary, alternative="greater", what=cfg.primary)
    holds, verdict_text = primary_verdict(v, tests)  # with the null's percentile where the primary is a null cell
    H = m.cfg.n_heads
    top_heads = [divmod(int(i), H) for i in abl["order"][:5]]
    traj_table = stats.markdown_table(
        ["prompts", f"plateau (last {cfg.plateau_tokens} instruction tokens)", f"last {cfg.final_tokens} prompt token(s)"]
        + [f"`{p}`" for p in post_labels] + ["response tokens", "refusal rate"],
        [[n, f"{t['plateau'].mean():.3f}", f"{t['final'].mean():.3f}"] + [f"{x:.3f}" for x in t["template"].mean(0)]
         + [f"{np.nanmean(t['reply']):.3f}", str(rate_estimate(t["refused"]))] for n, t in traj.items()])
    abl_table = stats.markdown_table(
        ["ablation", "Δ probe logit vs null mean (paired)", "Δ probe logit in the null", "Δ refusal score vs null mean",
         "Δ refusal score in the null"],
        [[name, str(x["probe_logit"]["vs_mean"]), str(x["probe_logit"]["vs_null"]), str(x["refusal_score"]["vs_mean"]),
          str(x["refusal_score"]["vs_null"])] for name, x in summary.items()])
    base = abl["rows"]["base"]
    d_h, d_s = stats.paired_difference(h["plateau"], h["final"]), stats.paired_difference(s["plateau"], s["final"])
    verdict = (f"Harmful prompts: the probe's P(harmful) goes from {h['plateau'].mean():.3f} on the instruction plateau "
               f"to {h['final'].mean():.3f} at the last prompt token(s), a drop of {d_h} (paired over prompts): " +
               ("**no cliff** (a drop under 0.1) on this model." if drop < 0.1 else
                "a drop, but harmless prompts drop about as much: a position effect, not a cliff specific to harmful "
                "prompts." if not cliff else
                "a cliff at the end of the prompt, specific to harmful prompts, as the paper reports for refusal "
                "intention.") +
               f" Harmless prompts (the control): {s['plateau'].mean():.3f} -> {s['final'].mean():.3f} "
               f"({d_s}). The probe was trained at t_inst only, so scores at template tokens, where "
               "harmful and harmless prompts move together, are partly the probe meeting positions it was not trained "
               f"on. The model refuses {rate_estimate(h['refused'])} of the harmful test prompts (greedy, substring "
               "match; Wilson interval).")
    abl_cells = [c for c in tests if c.startswith("top ")]
    # a head-specific effect needs the ablation to beat the null's mean on these prompts (paired) AND to lie above
    # the null distribution of random head sets (percentile): the paired test alone ignores how much random sets vary
    specific = [f"top {f:.0%} heads" for f in cfg.fractions
                if beats_null(v, tests, f"top {f:.0%} heads vs null mean: probe logit",
                              f"top {f:.0%} heads vs null (percentile): probe logit")]
    beats_mean = [c for c in abl_cells if "null mean" in c and cell_holds(v, tests, c)]
    abl_verdict = (f"Head-specific effect on the probe logit (the ablation beats the random-heads null's mean, "
                   f"Holm-corrected, and lies above the null's 95th percentile): {', '.join(specific)}." if specific
                   else "**No head-specific effect**: no ablation both beats the random-heads null's mean and lies "
                   "above the null's 95th percentile (verdict table)"
                   + (f"; {', '.join(beats_mean)} beat(s) the null's mean on these prompts, which alone does not "
                      "separate these heads from random head sets." if beats_mean else "."))
    v_table = stats.markdown_table(
        ["harmless set", "probe AUROC (own split)", "surface baseline (own split)", "probe AUROC at t_inst (test prompts)",
         "surface baseline (test)", "harmful plateau -> last token", "drop harmful", "drop harmless"],
        [[k, f"{x['probe_auroc']:.3f}", f"{x['probe_surface_auroc']:.3f}", _est(x["test_auroc_ci"]),
          f"{x['test_surface_auroc']:.3f}", f"{x['plateau_harmful']:.3f} -> {x['final_harmful']:.3f}",
          _est(x["drop_harmful_ci"]), _est(x["drop_harmless_ci"])] for k, x in variants.items()])
    main_v, norm_v = variants[f"{cfg.harmless} harmless"], variants["punctuation normalised"]
    ok, survive_text = survives(f"The layer-{layer} probe on the held-out test prompts", main_v["test_auroc"],
                                norm_v["test_auroc"], main_v["test_surface_auroc"], norm_v["test_surface_auroc"])
    no_cliff_everywhere = all(x["drop_harmful_ci"]["hi"] < 0.1 for x in variants.values())
    claims = [
        stats.Claim("The probe survives the surface controls (held-out AUROC above a surface-only baseline by >= 0.05, "
                    "matched and punctuation-normalised)",
                    f"matched {_est(main_v['test_auroc_ci'])} vs surface {main_v['test_surface_auroc']:.3f}; normalised "
                    f"{_est(norm_v['test_auroc_ci'])} vs surface {norm_v['test_surface_auroc']:.3f}", bool(ok)),
        stats.Claim("No cliff in any variant: every harmful drop's 95% interval lies below 0.1",
                    "; ".join(f"{k}: {_est(x['drop_harmful_ci'])}" for k, x in variants.items()), no_cliff_everywhere),
        stats.Claim("Harmful prompts' P(harmful) rises from the plateau to the last prompt token (a negative drop)",
                    str(d_h), bool(d_h.hi < 0)),
        stats.Claim("Harmful prompts' P(harmful) falls off a cliff at the end of the prompt (harmful drop > 0)"
                    + (" (primary)" if cfg.primary == "cliff: harmful drop" else ""),
                    str(tests["cliff: harmful drop"]), cell_holds(v, tests, "cliff: harmful drop")),
        stats.Claim("The cliff is specific to harmful prompts (harmful drop > 0 and > harmless drop; the difference "
                    "alone is also positive when both rise and harmful prompts, near the ceiling, rise less)",
                    f"harmful drop {tests['cliff: harmful drop']}; harmful - harmless "
                    f"{tests['specificity: harmful - harmless drop']}",
                    cell_holds(v, tests, "cliff: harmful drop")
                    and cell_holds(v, tests, "specificity: harmful - harmless drop")),
        stats.Claim("No head-specific effect: no ablation of the most negative heads both beats the random-heads "
                    "null's mean and lies above the null's distribution",
                    "; ".join(f"{c}: {tests[c]}" for c in abl_cells), not specific),
    ]
    sections = [
        ("Data and probe", f"n = {len(harmful[0])} harmful (HarmBench + StrongREJECT) and {len(harmless[0])} harmless "
                           f"training prompts; {len(harmful[2])} + {len(harmless[2])} held-out test prompts; seed "
                           f"{cfg.seed}; system prompt: {cfg.system_prompt or '(model default)'}. Logistic probe at "
                           f"layer {layer} (`resid_post`), t_inst, labels harmful vs harmless: it probes harmfulness, "
                           "not refusal intention (too few refusals to label). Its own held-out split: " +
                           ", ".join(f"{k} {x:.3f}" for k, x in probe_metrics.items()) + ". Surface form "
                           "(`interp.data.surface_stats`):\n\n"
                           + surface_table({"train harmful": harmful[0], "train harmless": harmless[0]})),
        ("Surface controls", "The probe beside a surface-only baseline (logistic regression on length, trailing "
                             "punctuation and final token), and the probe retrained with trailing punctuation removed "
                             "on both sides and on the original harmless set (controls score the prompt tokens only; "
                             "drops are plateau minus last prompt token, mean with a paired bootstrap 95% interval; "
                             "test AUROC with a bootstrap 95% interval over prompts):\n\n" + v_table
                             + f"\n\n{survive_text} "
                             + ("No cliff in any variant (every harmful drop's interval below 0.1)."
                                if no_cliff_everywhere else
                                "The harmful drop's interval reaches 0.1 in at least one variant (see the table).")),
        ("The cliff", traj_table + "\n\n" + verdict + "\n\n![trajectory](trajectory.png)"),
        ("Heads that push against the probe direction",
         f"c_h summed over the {len(harmful[2])} harmful test prompts at the last prompt token, for the "
         f"{int(np.isfinite(contrib).sum())} heads at layers <= {layer}; most negative: "
         + ", ".join(f"L{l}H{hh} ({contrib[l, hh]:.2f})" for l, hh in top_heads) +
         f". Zero-ablating them, against a null of {cfg.n_null} sets of as many random eligible heads (seed "
         f"{cfg.seed}), all in one vmapped program, on the {len(harmful[2])} harmful test prompts (base probe logit "
         f"{base['probe_logit']:.3f}, base refusal score {base['refusal_score']:.3f}). Per prompt, the top heads' change "
         "minus the null's mean change (paired bootstrap interval, sign-flip p), and the mean change's percentile in "
         "the null with the null's 5-95% band:\n\n" + abl_table
         + f"\n\n{abl_verdict}\n\n![head contributions](head_contributions.png)"),
        ("Verdict", verdict_text + "\n\n" + v.table),
        ("Claims", stats.claims_section(claims)),
        ("Sample responses", "\n".join(f"- {n}: {t['replies'][:2]}" for n, t in traj.items())),
    ]
    summary_out = {name: {key: dict(top=q["top"], null=q["null"], vs_mean=as_dict(q["vs_mean"]),
                                    vs_null=as_dict(q["vs_null"])) for key, q in x.items()}
                   for name, x in summary.items()}
    metrics = dict(probe_layer=layer, probe_test=probe_metrics, variants=variants, probe_survives=bool(ok),
                   trajectories={n: dict(plateau=float(t["plateau"].mean()), final=float(t["final"].mean()),
                                         template=t["template"].mean(0).tolist(), response=float(np.nanmean(t["reply"])),
                                         refusal_rate=t["refusal_rate"], mean_curve=np.nanmean(t["resampled"], 0).tolist())
                                 for n, t in traj.items()},
                   cliff_drop_harmful=drop, cliff_drop_harmless=drop_harmless, cliff=bool(cliff), ablations=abl["rows"],
                   ablation_summary=summary_out, most_negative_heads=[list(x) for x in top_heads],
                   tests={k: as_dict(t) for k, t in tests.items()}, primary=cfg.primary, verdict_holds=holds,
                   p_holm=v.p_holm, claims=[dict(text=c.text, statistic=c.statistic, holds=c.holds) for c in claims])
    return Report(sections, metrics)


STUDY = Study("refusal_cliff", "Refusal falls off a cliff (Yin et al. 2025)", Config, study, __doc__)


def main(argv=None, cfg: Config | None = None):
    """`python -m experiments.refusal_cliff`: the run folder and its metrics."""
    return STUDY.main(argv, cfg)


if __name__ == "__main__":
    main()
