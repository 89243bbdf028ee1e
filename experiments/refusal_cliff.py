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
                                refusal_token_ids, run_dir, save_figure, write_report)
from interp import probes
from interp.interventions import ScaleHeads
from interp.positions import LastInstruction, post_instruction_ids
from interp.readout import Readout
from models import transformer
from models.transformer import Capture


@dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"
    n_train: int = 96  # per class
    n_test: int = 32  # per class
    probe_layer: int = -1  # -1: two thirds of the depth
    system_prompt: str = ""
    max_new_tokens: int = 48
    n_points: int = 100
    plateau_tokens: int = 5  # instruction tokens (ending at t_inst) averaged for the plateau
    final_tokens: int = 1  # last prompt tokens averaged for the end of the cliff (1: where the reply starts)
    fractions: str = "0.01,0.03"  # fractions of the eligible heads ablated
    random_seeds: int = 5
    batch_size: int = 16
    seed: int = 0
    out: str = "runs"


def train_probe(m, cfg: Config, layer: int, harmful, harmless) -> tuple[probes.Probes, dict]:
    """A logistic probe at `layer`, t_inst, on `resid_post`; its held-out metrics from the probe's own split."""
    texts = chat_texts(m, harmful + harmless, cfg.system_prompt or None)
    acts = probes.collect(m, texts, LastInstruction(), site="resid_post", batch_size=cfg.batch_size)[layer:layer + 1]
    y = np.r_[np.ones(len(harmful)), np.zeros(len(harmless))]
    grid = probes.train(acts, y, seed=cfg.seed, layers=[layer], positions=["t_inst"], model=cfg.model)
    return grid.probes.cell(0, 0), grid.best_metrics("test")


def trajectories(m, cfg: Config, probe, prompts) -> dict:
    """Probe P(harmful) on every token of prompt + greedy response; prompt-only views tail-aligned at its end."""
    system = cfg.system_prompt or None
    texts = chat_texts(m, prompts, system)
    replies = models.generate(m, texts, cfg.max_new_tokens)
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
    return dict(resampled=resampled, tail=tail, plateau=plateau, final=final, template=template, reply=reply,
                replies=replies, refusal_rate=refusal_rate(replies))


def _pad(rows) -> np.ndarray:
    """Left-pad ragged rows into a `[B, T]` array (the layout `probes.trajectory` returns)."""
    T = max(len(r) for r in rows)
    out = np.zeros((len(rows), T))
    for i, r in enumerate(rows):
        out[i, T - len(r):] = r
    return out


def head_contributions(m, tokens, mask, direction, layer: int) -> np.ndarray:
    """`c[l, h] = sum_b head_out[l, b, last, h] . direction`, `[L, H]` from one forward (NaN above `layer`)."""
    T = tokens.shape[1]
    _, acts = models.forward(m, jnp.asarray(tokens), attention_mask=jnp.asarray(mask),
                             capture=(Capture("attn.head_out", positions=(T - 1,)),))
    c = np.asarray(jnp.einsum("lbthd,d->lh", acts["attn.head_out"], jnp.asarray(direction)), np.float64)
    c[layer + 1:] = np.nan
    return c


@eqx.filter_jit
def _ablation_scores(model, tokens, mask, head_masks, probe_arrays, metric, layer: int):
    """Probe logit (mean over prompts, last token, `resid_post` at `layer`) and refusal score for each `[L, H]`
    head scale mask, vmapped: `([N], [N])`. `probe_arrays` = (w, b, mean, scale) of one probe."""
    T = tokens.shape[1]
    probe = probes.Probes(*probe_arrays)
    L = model.cfg.n_layers

    def one(hm):
        capture = (Capture("resid_post", layers=(layer, L - 1), positions=(T - 1,)), Capture("final_norm", positions=(T - 1,)))
        _, acts = transformer.forward(model.params, model.cfg, tokens, mask, None, capture, (ScaleHeads(hm),))
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
    for f in (float(x) for x in cfg.fractions.split(",")):
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

    from interp.plot import heatmap
    heatmap(np.nan_to_num(contrib), title="head contribution to the probe direction (last prompt token)",
            path=str(out / "head_contributions.png"))


def main(argv=None, cfg: Config | None = None):
    cfg = cfg or parse_config(Config, argv, __doc__)
    out = run_dir("refusal_cliff", cfg.out)
    m = models.load(cfg.model)
    L = m.cfg.n_layers
    layer = cfg.probe_layer if cfg.probe_layer >= 0 else (2 * L) // 3
    metric = RefusalScore(jnp.asarray(refusal_token_ids(m)))
    harmful, harmless = instruction_splits(cfg.seed, (cfg.n_train, 0, cfg.n_test))
    probe, probe_metrics = train_probe(m, cfg, layer, harmful[0], harmless[0])
    traj = {"harmful": trajectories(m, cfg, probe, harmful[2]), "harmless": trajectories(m, cfg, probe, harmless[2])}
    tokens, mask = chat_batch(m, harmful[2], cfg.system_prompt or None)
    contrib = head_contributions(m, tokens, mask, probe.direction, layer)
    abl = head_ablations(m, cfg, contrib, probe, tokens, mask, metric)
    fractions = [float(x) for x in cfg.fractions.split(",")]
    summary = _summarise(abl["rows"], fractions)
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
    sections = [
        ("Data and probe", f"n = {len(harmful[0])} harmful (HarmBench + StrongREJECT) and {len(harmless[0])} harmless "
                           f"training prompts; {len(harmful[2])} + {len(harmless[2])} held-out test prompts; seed "
                           f"{cfg.seed}; system prompt: {cfg.system_prompt or '(model default)'}. Logistic probe at "
                           f"layer {layer} (`resid_post`), t_inst, labels harmful vs harmless: it probes harmfulness, "
                           "not refusal intention (too few refusals to label). Its own held-out split: " +
                           ", ".join(f"{k} {v:.3f}" for k, v in probe_metrics.items()) + "."),
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
    metrics = dict(probe_layer=layer, probe_test=probe_metrics,
                   trajectories={n: dict(plateau=float(t["plateau"].mean()), final=float(t["final"].mean()),
                                         template=t["template"].mean(0).tolist(), response=float(np.nanmean(t["reply"])),
                                         refusal_rate=t["refusal_rate"], mean_curve=np.nanmean(t["resampled"], 0).tolist())
                                 for n, t in traj.items()},
                   cliff_drop_harmful=drop, cliff_drop_harmless=drop_harmless, cliff=bool(cliff), ablations=abl["rows"], ablation_summary=summary,
                   most_negative_heads=[list(x) for x in top_heads])
    report = write_report(out, "Refusal falls off a cliff (Yin et al. 2025)", cfg, sections, metrics)
    print(f"wrote {report}")
    return out, metrics


if __name__ == "__main__":
    main()
