"""Refusal falls off a cliff (Yin et al. 2025), reproduced with interp's transforms.

    python -m experiments.refusal_cliff [--model NAME_OR_DIR] [--probe-layer 20] [--system-prompt "..."]

A logistic probe is trained at one layer on harmful vs harmless prompts at t_inst (the last instruction token).
It probes harmfulness, not refusal intention: the paper labels refusal intention from refused vs complied
prompts, which a model that rarely refuses cannot supply. The probe then scores every token of prompt +
greedy response of held-out prompts; trajectories are tail-aligned to the end of the prompt and resampled to
`n_points`, and the report gives the drop from the instruction plateau to the final template tokens (the
"cliff"). Each head's contribution `c_h = sum over prompts of (head output at the last prompt token) . r`
(r the probe's unit direction, heads at layers <= the probe layer) comes from one forward; the top 1% / 3% most
negative heads are zero-ablated, against the same number of random heads (several seeds), all conditions in
one vmapped program, measuring the probe score and the refusal score at the last prompt token.

Surface form (issue 21): the harmless prompts are matched to the harmful ones on surface form by default
(`interp.data.matched_pairs("both")`); the probe's accuracy is reported beside a surface-only baseline (length,
trailing punctuation, final token), and the probe and the prompt trajectories are rerun with trailing punctuation
removed on both sides and on the original, confounded harmless set (prompt tokens only, no generation).
"""

from __future__ import annotations

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import models
from experiments.common import (RefusalScore, chat_batch, chat_texts, instruction_splits, parse_config, refusal_rate,
                                refusal_token_ids, run_dir, save_figure, surface_baseline, surface_table, survives,
                                undefined_to_none, write_report)
from interp import probes
from interp.interventions import ScaleHeads
from interp.positions import LastInstruction, post_instruction_ids
from interp.readout import Readout
from models import transformer
from models.transformer import Capture
from models.errors import check_field

HARMLESS_STYLES = ("matched", "original", "harmbench", "strongreject")  # interp.data.harmless_instructions


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
    random_seeds: int = 5  # random-head controls per fraction
    batch_size: int = 16  # prompts per forward
    seed: int = 0  # data splits and random controls
    harmless: str = "matched"  # harmless prompts: "matched" to the harmful ones on surface form, or "original" (confounded)
    out: str = "runs"  # reports go to OUT/<experiment>/<timestamp>/

    def __post_init__(self):
        for name, lo in (("n_train", 4), ("n_test", 1), ("max_new_tokens", 1), ("n_points", 2), ("plateau_tokens", 1),
                         ("final_tokens", 1), ("batch_size", 1), ("seed", 0)):
            check_field(name, getattr(self, name), lo=lo, integer=True)
        check_field("probe_layer", self.probe_layer, lo=-1, integer=True)  # its upper bound once the model is loaded
        check_field("fractions", self.fractions, lo=0, hi=1, open_lo=True, each=True)
        check_field("harmless", self.harmless, choices=HARMLESS_STYLES)


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
                t_inst=t_inst, replies=replies, refusal_rate=refusal_rate(replies) if generate else float("nan"))


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
    """Probe logit (mean over prompts, last token, `resid_post` at `layer`) and refusal score for each `[L, H]`
    head scale mask, vmapped: `([N], [N])`. `probe_arrays` = (w, b, mean, scale) of one probe."""
    probe = probes.Probes(*probe_arrays)
    L = model.cfg.n_layers

    def one(hm):
        capture = (Capture("resid_post", layers=(layer, L - 1), positions=(-1,)), Capture("final_norm", positions=(-1,)))
        _, acts = models.forward(model, tokens, mask, None, capture, (ScaleHeads(hm),))
        resid = acts["resid_post"]  # [2, B, 1, D]: the probe's layer and the last layer
        r = Readout(transformer.unembed(model.params, acts["final_norm"], model.cfg), resid[1])
        return jnp.mean(probe.logits(resid[0, :, 0])), metric(r)

    return jax.vmap(one)(head_masks)


def head_ablations(m, cfg: Config, contrib: np.ndarray, probe, tokens, mask, metric) -> dict:
    """Zero-ablate the most negative heads (each fraction) and as many random eligible heads (`random_seeds` each)."""
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
        for s in range(cfg.random_seeds):
            r = np.ones(L * H)
            r[rng.choice(eligible, k, replace=False)] = 0
            conditions[f"random {f:.0%} seed {s}"] = r
    names = list(conditions)
    masks = jnp.asarray(np.stack([conditions[n] for n in names]).reshape(-1, L, H), jnp.float32)
    arrays = tuple(jnp.asarray(a, jnp.float32) for a in (probe.w, probe.b, probe.mean, probe.scale))
    z, ref = _ablation_scores(m, jnp.asarray(tokens), jnp.asarray(mask), masks, arrays, metric, int(probe.layers[0]))
    rows = {n: dict(probe_logit=float(a), refusal_score=float(b)) for n, a, b in zip(names, np.asarray(z), np.asarray(ref))}
    return dict(rows=rows, order=order)


def _summarise(rows: dict, fractions) -> dict:
    """For each fraction: change from base of the top heads' ablation and mean +- sd over the random seeds."""
    base = rows["base"]
    out = {}
    for f in fractions:
        top = next(n for n in rows if n.startswith(f"top {f:.0%} "))
        rand = [v for n, v in rows.items() if n.startswith(f"random {f:.0%} ")]
        out[top] = {key: dict(top=rows[top][key] - base[key],
                              random_mean=float(np.mean([r[key] - base[key] for r in rand])),
                              random_sd=float(np.std([r[key] - base[key] for r in rand])))
                    for key in ("probe_logit", "refusal_score")}
    return out


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

    from matplotlib.colors import ListedColormap

    from interp.plot import heatmap
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
    return dict(probe_auroc=probe_metrics["auroc"], probe_surface_auroc=probe_metrics["surface_auroc"],
                test_auroc=float(probes.auroc(np.r_[h["t_inst"], s["t_inst"]], y)), test_surface_auroc=surface["auroc"],
                plateau_harmful=float(h["plateau"].mean()), final_harmful=float(h["final"].mean()),
                drop_harmful=float(np.mean(h["plateau"] - h["final"])),
                drop_harmless=float(np.mean(s["plateau"] - s["final"])))


def main(argv=None, cfg: Config | None = None):
    cfg = cfg or parse_config(Config, argv, __doc__)
    out = run_dir("refusal_cliff", cfg.out)
    m = models.load(cfg.model)
    L = m.cfg.n_layers
    check_field("probe_layer", cfg.probe_layer, lo=-1, hi=L - 1, integer=True)  # before any compute
    layer = cfg.probe_layer if cfg.probe_layer >= 0 else (2 * L) // 3
    metric = RefusalScore(jnp.asarray(refusal_token_ids(m)))
    harmful, harmless = instruction_splits(cfg.seed, (cfg.n_train, 0, cfg.n_test), harmless=cfg.harmless)
    probe, probe_metrics = train_probe(m, cfg, layer, harmful[0], harmless[0])
    traj = {"harmful": trajectories(m, cfg, probe, harmful[2]), "harmless": trajectories(m, cfg, probe, harmless[2])}
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
    tokens, mask = chat_batch(m, harmful[2], cfg.system_prompt or None)
    contrib = head_contributions(m, tokens, mask, probe.direction, layer)
    abl = head_ablations(m, cfg, contrib, probe, tokens, mask, metric)
    summary = _summarise(abl["rows"], cfg.fractions)
    post_labels = [repr(m.decode([t], skip_special=False))[1:-1].replace("|", "¦") for t in post_instruction_ids(m)]
    _figures(out, traj, contrib, post_labels, cfg)

    h, s = traj["harmful"], traj["harmless"]
    drop = float(np.mean(h["plateau"] - h["final"]))
    drop_harmless = float(np.mean(s["plateau"] - s["final"]))
    cliff = drop >= 0.1 and drop - drop_harmless >= 0.1
    H = m.cfg.n_heads
    top_heads = [divmod(int(i), H) for i in abl["order"][:5]]
    traj_table = (f"| prompts | plateau (last {cfg.plateau_tokens} instruction tokens) | last {cfg.final_tokens} prompt "
                  "token(s) | " + " | ".join(f"`{p}`" for p in post_labels) + " | response tokens | refusal rate |\n|---|"
                  + "---|" * (len(post_labels) + 4) + "\n")
    traj_table += "\n".join(f"| {n} | {t['plateau'].mean():.3f} | {t['final'].mean():.3f} | "
                            + " | ".join(f"{v:.3f}" for v in t["template"].mean(0))
                            + f" | {np.nanmean(t['reply']):.3f} | {t['refusal_rate']:.2f} |" for n, t in traj.items())
    abl_table = "| ablation | Δ probe logit | Δ refusal score |\n|---|---|---|\n"
    abl_table += "\n".join(f"| {name} | {v['probe_logit']['top']:+.3f} (random: {v['probe_logit']['random_mean']:+.3f} ± "
                           f"{v['probe_logit']['random_sd']:.3f}) | {v['refusal_score']['top']:+.3f} (random: "
                           f"{v['refusal_score']['random_mean']:+.3f} ± {v['refusal_score']['random_sd']:.3f}) |"
                           for name, v in summary.items())
    base = abl["rows"]["base"]
    verdict = (f"Harmful prompts: the probe's P(harmful) goes from {h['plateau'].mean():.3f} on the instruction plateau "
               f"to {h['final'].mean():.3f} at the last prompt token(s), a drop of {drop:+.3f}: " +
               ("**no cliff** (a drop under 0.1) on this model." if drop < 0.1 else
                "a drop, but harmless prompts drop about as much: a position effect, not a cliff specific to harmful "
                "prompts." if not cliff else
                "a cliff at the end of the prompt, specific to harmful prompts, as the paper reports for refusal "
                "intention.") +
               f" Harmless prompts (the control): {s['plateau'].mean():.3f} -> {s['final'].mean():.3f} "
               f"({drop_harmless:+.3f}). The probe was trained at t_inst only, so scores at template tokens, where "
               "harmful and harmless prompts move together, are partly the probe meeting positions it was not trained "
               f"on. The model refuses {h['refusal_rate']:.0%} of the harmful test prompts (greedy, substring match).")
    specific = [name for name, v in summary.items()
                if abs(v["probe_logit"]["top"] - v["probe_logit"]["random_mean"]) > 2 * v["probe_logit"]["random_sd"]]
    abl_verdict = (f"The most negative heads' ablation differs from the random heads' by more than 2 sd for: "
                   f"{', '.join(specific)}." if specific else
                   "**No head-specific effect**: ablating the most negative heads changes the probe score within 2 sd "
                   "of ablating as many random heads.")
    v_table = ("| harmless set | probe AUROC (own split) | surface baseline (own split) | probe AUROC at t_inst (test "
               "prompts) | surface baseline (test) | harmful plateau -> last token | drop harmful | drop harmless |\n"
               "|---|---|---|---|---|---|---|---|\n")
    v_table += "\n".join(f"| {k} | {v['probe_auroc']:.3f} | {v['probe_surface_auroc']:.3f} | {v['test_auroc']:.3f} | "
                         f"{v['test_surface_auroc']:.3f} | {v['plateau_harmful']:.3f} -> {v['final_harmful']:.3f} | "
                         f"{v['drop_harmful']:+.3f} | {v['drop_harmless']:+.3f} |" for k, v in variants.items())
    main_v, norm_v = variants[f"{cfg.harmless} harmless"], variants["punctuation normalised"]
    ok, survive_text = survives(f"The layer-{layer} probe on the held-out test prompts", main_v["test_auroc"],
                                norm_v["test_auroc"], main_v["test_surface_auroc"], norm_v["test_surface_auroc"])
    no_cliff_everywhere = all(v["drop_harmful"] < 0.1 for v in variants.values())
    sections = [
        ("Data and probe", f"n = {len(harmful[0])} harmful (HarmBench + StrongREJECT) and {len(harmless[0])} harmless "
                           f"training prompts; {len(harmful[2])} + {len(harmless[2])} held-out test prompts; seed "
                           f"{cfg.seed}; system prompt: {cfg.system_prompt or '(model default)'}. Logistic probe at "
                           f"layer {layer} (`resid_post`), t_inst, labels harmful vs harmless: it probes harmfulness, "
                           "not refusal intention (too few refusals to label). Its own held-out split: " +
                           ", ".join(f"{k} {v:.3f}" for k, v in probe_metrics.items()) + ". Surface form "
                           "(`interp.data.surface_stats`):\n\n"
                           + surface_table({"train harmful": harmful[0], "train harmless": harmless[0]})),
        ("Surface controls", "The probe beside a surface-only baseline (logistic regression on length, trailing "
                             "punctuation and final token), and the probe retrained with trailing punctuation removed "
                             "on both sides and on the original harmless set (controls score the prompt tokens only; "
                             "drops are plateau minus last prompt token):\n\n" + v_table + f"\n\n{survive_text} "
                             + ("No cliff in any variant (every harmful drop under 0.1)." if no_cliff_everywhere else
                                "The harmful drop reaches 0.1 in at least one variant (see the table).")),
        ("The cliff", traj_table + "\n\n" + verdict + "\n\n![trajectory](trajectory.png)"),
        ("Heads that push against the probe direction",
         f"c_h summed over the {len(harmful[2])} harmful test prompts at the last prompt token, for the "
         f"{int(np.isfinite(contrib).sum())} heads at layers <= {layer}; most negative: "
         + ", ".join(f"L{l}H{hh} ({contrib[l, hh]:.2f})" for l, hh in top_heads) +
         f". Zero-ablating them, against the same number of random eligible heads ({cfg.random_seeds} seeds, mean ± sd), "
         f"on the harmful test prompts (base probe logit {base['probe_logit']:.3f}, base refusal score "
         f"{base['refusal_score']:.3f}):\n\n" + abl_table + f"\n\n{abl_verdict}\n\n![head contributions](head_contributions.png)"),
        ("Sample responses", "\n".join(f"- {n}: {t['replies'][:2]}" for n, t in traj.items())),
    ]
    metrics = dict(probe_layer=layer, probe_test=probe_metrics, variants=variants, probe_survives=bool(ok),
                   trajectories={n: dict(plateau=float(t["plateau"].mean()), final=float(t["final"].mean()),
                                         template=t["template"].mean(0).tolist(), response=float(np.nanmean(t["reply"])),
                                         refusal_rate=t["refusal_rate"], mean_curve=np.nanmean(t["resampled"], 0).tolist())
                                 for n, t in traj.items()},
                   cliff_drop_harmful=drop, cliff_drop_harmless=drop_harmless, cliff=bool(cliff), ablations=abl["rows"], ablation_summary=summary,
                   most_negative_heads=[list(x) for x in top_heads])
    metrics = undefined_to_none(metrics)
    report = write_report(out, "Refusal falls off a cliff (Yin et al. 2025)", cfg, sections, metrics)
    print(f"wrote {report}")
    return out, metrics


if __name__ == "__main__":
    main()
