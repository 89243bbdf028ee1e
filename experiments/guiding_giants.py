"""Guiding Giants (Hegazy et al. 2025, arXiv 2505.20309): a trained controller weights refusal steering per
prompt and per layer.

    python -m experiments.guiding_giants [--model NAME_OR_DIR] [--alphas 4,16,64] [--n-train 64] [--n-test 16]

The controller reads the concatenated `resid_post` of the last 4 layers at the last prompt token (collected once,
unsteered) and outputs a global scale `s` (a raw logit) and per-layer weights `w_l = sigmoid`; each steered layer
gets `alpha * s * w_l * d_hat` at `resid_post`, one `AddVectorPerExample` for the whole batch, on the prompt pass and
every generated token. Two modes: the paper's (every layer, every position) and the authors' code (the last layer,
the newest token only). Two directions: the authors' embedding-phrase direction and the Arditi difference of means
(`experiments.refusal_direction.select_direction`). Controllers: BCE-trained as in the authors' code, and the same
fine-tuned end to end by `jax.grad` through the steered forward (refusal log-odds on harmful minus lambda * KL on
harmless prompts; paper mode). Controls over the same alpha grid: no steering, constant always-on steering with the
same direction (the BCE controller's mean per-layer scale on harmful training prompts), the BCE controller with a
random unit direction, a label-shuffled controller. HarmBench train/test split with its surface-matched harmless
set; StrongREJECT (and its matched harmless set) is a test source never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import models
from experiments import refusal_direction
from experiments.common import (KLFromBase, RefusalScore, chat_batch, chat_texts, instruction_splits, parse_config,
                                refusal_rate, refusal_token_ids, run_dir, save_figure, write_report)
from experiments.gg_controller import (EndToEndSpec, TrainSpec, last_layer_logp, phrase_direction, prompt_pass,
                                       steer_scales, train_controller, train_end_to_end)
from interp.directions import cosine, normalize
from interp.interventions import AddVectorPerExample, Where
from interp.probes import auroc
from interp.readout import Readout

GROUPS = ("harmbench harmful", "harmbench harmless", "strongreject harmful", "strongreject harmless")


@dataclass(frozen=True)
class Config:
    # data
    model: str = "smollm2-135m-instruct"  # registered name, .gguf file or Hugging Face directory
    n_train: int = 64  # per class: HarmBench train split and its surface-matched harmless set
    n_val: int = 16  # per class: validation split (Arditi direction selection only)
    n_test: int = 16  # per class and test source (HarmBench test split; StrongREJECT, never trained on)
    system_prompt: str = ""  # system message for the chat template (empty: the model's default)
    # controller (the authors' configuration)
    feature_layers: int = 4  # last layers whose resid_post at the last prompt token the controller reads
    hidden: int = 1024  # controller hidden width
    lr: float = 5e-5  # AdamW learning rate of the BCE controller
    epochs: int = 10  # BCE training epochs
    batch: int = 8  # BCE training batch size
    # steering
    alphas: tuple[float, ...] = (4.0, 16.0, 64.0)  # patch scales (the authors use 4 with a unit direction)
    arditi_layer_stride: int = 6  # Arditi candidates at every k-th layer
    # end to end (paper mode)
    e2e_steps: int = 16  # end-to-end optimisation steps (jax.grad through the steered forward)
    e2e_lr: float = 1e-3  # end-to-end Adam learning rate
    e2e_lambda: float = 1.0  # weight of KL(base || steered) on harmless prompts
    e2e_alpha: float = 4.0  # patch scale during end-to-end training
    e2e_train_s: bool = False  # also train the global scale s (else only the w path)
    # evaluation
    max_new_tokens: int = 12  # greedy tokens per evaluated generation
    batch_size: int = 32  # rows per forward chunk
    seed: int = 0  # splits, controller initialisation, random direction, label shuffle
    out: str = "runs"  # reports go to <out>/guiding_giants/<timestamp>/


def _group_metrics(logp, base_logp, groups: dict[str, np.ndarray], ids) -> dict:
    """Refusal score (mean log-odds of a refusal opening) per group and KL(base || steered) on harmless groups."""
    r = lambda lp, rows: Readout(jnp.asarray(lp[rows])[:, None], None)
    out = {f"refusal_score {g}": float(RefusalScore(ids)(r(logp, rows))) for g, rows in groups.items()}
    out.update({f"kl {g}": float(KLFromBase(jnp.asarray(base_logp[rows]))(r(logp, rows)))
                for g, rows in groups.items() if "harmless" in g})
    return out


def conditions(cfg: Config, L: int, directions: dict, random_dir, scales: dict, constant):
    """Every steered condition: (mode, where, alpha, kind, direction name, unit direction, scales [N, L] / alpha)."""
    out = []
    for mode, where in (("paper", Where()), ("authors", Where(layers=(L - 1,), positions=(-1,)))):
        for alpha in cfg.alphas:
            for dname, d in directions.items():
                out.append((mode, where, alpha, "controller", dname, d, scales["controller"]))
                out.append((mode, where, alpha, "constant", dname, d, constant))
                out.append((mode, where, alpha, "label-shuffled", dname, d, scales["label-shuffled"]))
                if mode == "paper":
                    out.append((mode, where, alpha, "end-to-end", dname, d, scales[f"end-to-end {dname}"]))
            out.append((mode, where, alpha, "random direction", "random", random_dir, scales["controller"]))
    return out


def evaluate(m, cfg: Config, conds, test, last_resid, gen_texts, gen_rows, base_logp, groups, ids) -> tuple[dict, dict]:
    """Refusal score and KL (steered prompt pass over every test group; in the authors' mode exactly from the
    unsteered last-layer residual `last_resid [N, D]`) and refusal rate (one `models.generate` call over the
    HarmBench test rows) for no steering and every condition."""
    n_gen = len(groups["harmbench harmful"])  # gen_texts: the HarmBench harmful, then harmless test prompts
    rows, samples = {}, {}
    gen = models.generate(m, gen_texts, cfg.max_new_tokens)
    rows["none"] = dict(mode="none", alpha=0.0, kind="no steering", direction="-",
                        **_group_metrics(base_logp, base_logp, groups, ids),
                        refusal_rate_harmful=refusal_rate(gen[:n_gen]), refusal_rate_harmless=refusal_rate(gen[n_gen:]))
    samples["none"] = (gen[0], gen[n_gen])
    for mode, where, alpha, kind, dname, d, scale in conds:
        sc = alpha * np.broadcast_to(scale, (len(test[0]), scale.shape[-1]))
        steer = lambda r: (AddVectorPerExample("resid_post", d, sc[r], where=where),)
        if mode == "authors":
            logp = np.asarray(last_layer_logp(m, last_resid, sc[:, -1], d))
        else:
            _, logp = prompt_pass(m, *test, cfg.feature_layers, cfg.batch_size, steer)
        gen = models.generate(m, gen_texts, cfg.max_new_tokens, interventions=steer(gen_rows))
        name = f"{mode} · {kind} · {dname} · α={alpha:g}"
        rows[name] = dict(mode=mode, alpha=float(alpha), kind=kind, direction=dname,
                          **_group_metrics(logp, base_logp, groups, ids),
                          refusal_rate_harmful=refusal_rate(gen[:n_gen]), refusal_rate_harmless=refusal_rate(gen[n_gen:]))
        samples[name] = (gen[0], gen[n_gen])
    for r in rows.values():
        r["selectivity_rate"] = r["refusal_rate_harmful"] - r["refusal_rate_harmless"]
        for src in ("harmbench", "strongreject"):
            r[f"selectivity_score {src}"] = r[f"refusal_score {src} harmful"] - r[f"refusal_score {src} harmless"]
    return rows, samples


def _figures(out, cfg: Config, rows, w_means, L):
    kinds = ("controller", "end-to-end", "constant", "label-shuffled", "random direction")
    colors = dict(zip(kinds, ("C0", "C3", "C1", "C2", "C7")))
    fig = Figure(figsize=(17, 8))
    base = rows["none"]
    panels = [(mode, d) for mode in ("paper", "authors") for d in ("phrase", "arditi")]
    for j, (mode, dname) in enumerate(panels):
        for i, (hx, hy, label) in enumerate([("refusal_rate_harmless", "refusal_rate_harmful", "refusal rate"),
                                             ("refusal_score harmbench harmless", "refusal_score harmbench harmful",
                                              "refusal score (log-odds)")]):
            ax = fig.add_subplot(2, 4, 4 * i + j + 1)
            for kind in kinds:
                pts = [r for r in rows.values() if r["mode"] == mode and r["kind"] == kind
                       and r["direction"] in (dname, "random")]
                if pts:
                    ax.plot([p[hx] for p in pts], [p[hy] for p in pts], "-o", color=colors[kind], label=kind)
                    for p in pts:
                        ax.annotate(f"{p['alpha']:g}", (p[hx], p[hy]), fontsize=6)
            ax.plot([base[hx]], [base[hy]], "k*", ms=12, label="no steering")
            lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
            hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
            ax.plot([lo, hi], [lo, hi], ":", color="grey", lw=0.8)
            ax.set(xlabel=f"{label}, harmless", ylabel=f"{label}, harmful", title=f"{mode} mode, {dname} direction")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"Selectivity on HarmBench test prompts (points: alpha {', '.join(f'{a:g}' for a in cfg.alphas)}; "
                 "above the diagonal = more refusal on harmful than harmless)")
    save_figure(fig, out / "selectivity.png")
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    for name, (harm, safe) in w_means.items():
        line, = ax.plot(range(L), harm, "-o", ms=3, label=f"{name}, harmful")
        ax.plot(range(L), safe, "--", color=line.get_color(), label=f"{name}, harmless")
    ax.set(xlabel="layer", ylabel="w_l = sigmoid (mean over test prompts)", title="learned per-layer weights")
    ax.legend(fontsize=7)
    save_figure(fig, out / "layer_weights.png")


def _verdict(rows, alphas) -> tuple[str, bool]:
    """Whether the controller's refusal-rate selectivity beats every control at the same alpha by >= 10 points."""
    lines, effect = [], False
    for mode in ("paper", "authors"):
        for dname in ("phrase", "arditi"):
            for a in alphas:
                get = lambda kind, d=dname: next(r for r in rows.values() if r["mode"] == mode and r["kind"] == kind
                                                 and r["direction"] == d and r["alpha"] == a)
                ctrl = get("controller")
                controls = [get("constant"), get("label-shuffled"), get("random direction", "random")]
                margin = ctrl["selectivity_rate"] - max(max(c["selectivity_rate"] for c in controls),
                                                        rows["none"]["selectivity_rate"])
                effect |= margin >= 0.1
                lines.append((mode, dname, a, ctrl["selectivity_rate"], margin,
                              ctrl["selectivity_score harmbench"] - max(c["selectivity_score harmbench"] for c in controls)))
    table = "| mode | direction | α | controller selectivity (rate) | minus best control | score selectivity minus best control |\n|---|---|---|---|---|---|\n"
    table += "\n".join(f"| {m} | {d} | {a:g} | {s:+.2f} | {mg:+.2f} | {sm:+.2f} |" for m, d, a, s, mg, sm in lines)
    return table, effect


def main(argv=None, cfg: Config | None = None):
    cfg = cfg or parse_config(Config, argv, __doc__)
    out = run_dir("guiding_giants", cfg.out)
    m = models.load(cfg.model)
    L = m.cfg.n_layers
    ids = jnp.asarray(refusal_token_ids(m))
    system = cfg.system_prompt or None
    hb_harm, hb_safe = instruction_splits(cfg.seed, (cfg.n_train, cfg.n_val, cfg.n_test), source="harmbench")
    sr_harm, sr_safe = instruction_splits(cfg.seed, (0, 0, cfg.n_test), source="strongreject")
    # controller inputs, collected once (unsteered)
    train_tm = chat_batch(m, hb_harm[0] + hb_safe[0], system)
    y = np.r_[np.ones(len(hb_harm[0])), np.zeros(len(hb_safe[0]))]
    x_tr, logp_tr = prompt_pass(m, *train_tm, cfg.feature_layers, cfg.batch_size)
    test_sets = (hb_harm[2], hb_safe[2], sr_harm[2], sr_safe[2])
    bounds = np.cumsum([0] + [len(t) for t in test_sets])
    groups = {g: np.arange(a, b) for g, a, b in zip(GROUPS, bounds[:-1], bounds[1:])}
    test = chat_batch(m, [p for t in test_sets for p in t], system)
    x_te, base_logp = prompt_pass(m, *test, cfg.feature_layers, cfg.batch_size)
    # controllers
    spec = TrainSpec(n_hidden=cfg.hidden, lr=cfg.lr, batch=cfg.batch, epochs=cfg.epochs)
    k_bce, k_shuffle, k_rand = jax.random.split(jax.random.key(cfg.seed), 3)
    ctrl, bce_curve = train_controller(x_tr, y, L, spec, k_bce, out / "checkpoints" / "bce")
    y_shuffled = np.random.default_rng(cfg.seed).permutation(y)
    shuffled, _ = train_controller(x_tr, y_shuffled, L, spec, k_shuffle, out / "checkpoints" / "label_shuffled")
    # directions
    rd_cfg = refusal_direction.Config(model=cfg.model, system_prompt=cfg.system_prompt,
                                      layer_stride=cfg.arditi_layer_stride, sweep_batch=cfg.batch_size)
    sel = refusal_direction.select_direction(m, rd_cfg, hb_harm, hb_safe, RefusalScore(ids))
    directions = {"phrase": phrase_direction(m), "arditi": normalize(sel["direction"])}
    random_dir = normalize(jax.random.normal(k_rand, (m.cfg.d_model,)))
    # end to end through the steered forward (paper mode)
    e2e_spec = EndToEndSpec(steps=cfg.e2e_steps, batch=cfg.batch, lr=cfg.e2e_lr, lam=cfg.e2e_lambda,
                            alpha=cfg.e2e_alpha, train_s=cfg.e2e_train_s)
    controllers = {"controller": ctrl, "label-shuffled": shuffled}
    e2e_curves = {}
    for dname, d in directions.items():
        controllers[f"end-to-end {dname}"], e2e_curves[dname] = train_end_to_end(
            m, ctrl, d, x_tr, *train_tm, y > 0, logp_tr, ids, e2e_spec, spec, cfg.seed,
            checkpoints=out / "checkpoints" / f"end_to_end_{dname}")
    outputs = {name: tuple(np.asarray(v) for v in c(jnp.asarray(x_te))) for name, c in controllers.items()}
    if not cfg.e2e_train_s:  # the end-to-end copy's own s drifted with its body; it steers with the BCE controller's
        for dname in directions:
            outputs[f"end-to-end {dname}"] = (outputs["controller"][0], outputs[f"end-to-end {dname}"][1])
    scales = {name: np.asarray(steer_scales(jnp.asarray(s), jnp.asarray(w), 1.0)) for name, (s, w) in outputs.items()}
    s_tr, w_tr = ctrl(jnp.asarray(x_tr))
    constant = np.asarray(steer_scales(s_tr, w_tr, 1.0))[y > 0].mean(0)  # [L]
    aurocs = {name: {src: float(auroc(s[np.r_[groups[f"{src} harmful"], groups[f"{src} harmless"]]],
                                      np.r_[np.ones(len(groups[f"{src} harmful"])), np.zeros(len(groups[f"{src} harmless"]))]))
                     for src in ("harmbench", "strongreject")}
              for name, (s, _) in outputs.items() if cfg.e2e_train_s or not name.startswith("end-to-end")}
    # evaluation
    conds = conditions(cfg, L, directions, random_dir, scales, constant)
    gen_rows = np.r_[groups["harmbench harmful"], groups["harmbench harmless"]]
    gen_texts = chat_texts(m, hb_harm[2] + hb_safe[2], system)
    rows, samples = evaluate(m, cfg, conds, test, x_te[:, -m.cfg.d_model:], gen_texts, gen_rows, base_logp, groups, ids)
    w_means = {name: (w[groups["harmbench harmful"]].mean(0), w[groups["harmbench harmless"]].mean(0))
               for name, (_, w) in outputs.items()}
    _figures(out, cfg, rows, w_means, L)
    verdict_table, effect = _verdict(rows, cfg.alphas)

    n = {g: len(r) for g, r in groups.items()}
    table = ("| condition | refusal rate harmful | harmless | selectivity | refusal score HB harmful | HB harmless | "
             "SR harmful | SR harmless | KL HB harmless | KL SR harmless |\n|---|---|---|---|---|---|---|---|---|---|\n")
    table += "\n".join(
        f"| {name} | {r['refusal_rate_harmful']:.2f} | {r['refusal_rate_harmless']:.2f} | {r['selectivity_rate']:+.2f} | "
        f"{r['refusal_score harmbench harmful']:.2f} | {r['refusal_score harmbench harmless']:.2f} | "
        f"{r['refusal_score strongreject harmful']:.2f} | {r['refusal_score strongreject harmless']:.2f} | "
        f"{r['kl harmbench harmless']:.3f} | {r['kl strongreject harmless']:.3f} |" for name, r in rows.items())
    auroc_table = "| controller | AUROC HarmBench test | AUROC StrongREJECT (never trained on) |\n|---|---|---|\n" + "\n".join(
        f"| {name} | {a['harmbench']:.3f} | {a['strongreject']:.3f} |" for name, a in aurocs.items())
    s_bce = outputs["controller"][0]
    verdict = ("The BCE controller's refusal-rate selectivity beats every control at the same α by at least 10 points "
               "somewhere on the grid." if effect else
               "**No effect beyond the controls:** at no α, mode or direction does the BCE controller's refusal-rate "
               "selectivity (harmful minus harmless) beat the best of no steering, constant steering, the random "
               "direction and the label-shuffled controller by 10 points.")
    sections = [
        ("Data", f"n = {len(hb_harm[0])} + {len(hb_safe[0])} training prompts (HarmBench train split and its surface-"
                 f"matched harmless set), {len(hb_harm[1])} + {len(hb_safe[1])} validation (Arditi selection), test "
                 f"{n} (StrongREJECT never trained on), seed {cfg.seed}. Refusal rates (substring judge, greedy, "
                 f"{cfg.max_new_tokens} new tokens) on the HarmBench test prompts; refusal scores and KL on every "
                 "test group."),
        ("Controller", f"BCE training loss per epoch: {', '.join(f'{v:.3f}' for v in bce_curve)}. Global scale s on "
                       f"test prompts (raw logit): harmful mean {s_bce[groups['harmbench harmful']].mean():+.2f}, "
                       f"harmless {s_bce[groups['harmbench harmless']].mean():+.2f}; constant control per-layer scale "
                       f"(mean s·w_l on harmful training prompts) {constant.mean():.2f} on average.\n\n" + auroc_table +
                       "\n\nThe BCE loss gives the layer weights no task gradient: only the regulariser touches them "
                       "(pulling σ(w) towards 0.5), so the BCE controller's w_l carry no information about layers.\n\n"
                       "![layer weights](layer_weights.png)"),
        ("Directions", f"Phrase direction (mean input embedding of refusal minus compliance phrases) and Arditi "
                       f"difference of means (`refusal_direction.select_direction`, layers every "
                       f"{cfg.arditi_layer_stride}: selected layer {sel['layer']}, position {sel['position']}, "
                       f"{sel['n_pass']} candidates pass the filters{'; relaxed' if sel['relaxed'] else ''}), both unit "
                       f"norm; cosine between them {float(cosine(directions['phrase'], directions['arditi'])):+.3f}. "
                       "Random control: one seeded unit Gaussian direction."),
        ("End to end", f"Objective −refusal log-odds(harmful) + {cfg.e2e_lambda} · KL(harmless), α = {cfg.e2e_alpha}, "
                       f"{cfg.e2e_steps} steps of {cfg.batch} + {cfg.batch} training prompts, "
                       f"{'s and w' if cfg.e2e_train_s else 'w only (s from the BCE controller)'}: " +
                       "; ".join(f"{d}: {c[0]:.3f} → {c[-1]:.3f} (mean of last 5: {np.mean(c[-5:]):.3f})"
                                 for d, c in e2e_curves.items())),
        ("Results", table + "\n\nModes: paper = every layer's `resid_post`, every position, prompt pass and every "
                    "generated token; authors = last layer, newest token only. Constant = the BCE controller's mean "
                    "per-layer scale on harmful training prompts, for every prompt.\n\n"
                    "![selectivity](selectivity.png)"),
        ("Controller against the controls", verdict_table + "\n\n" + verdict),
        ("Sample generations", "\n".join(f"- **{name}**: harmful: {h[:90]!r}; harmless: {s[:90]!r}"
                                        for name, (h, s) in samples.items())),
    ]
    metrics = dict(n=n, bce_loss=bce_curve, end_to_end_objective=e2e_curves, auroc=aurocs,
                   arditi=dict(layer=sel["layer"], position=sel["position"], n_pass=sel["n_pass"]),
                   conditions=rows, layer_weights={k: [v[0].tolist(), v[1].tolist()] for k, v in w_means.items()},
                   effect_beyond_controls=bool(effect))
    report = write_report(out, "Guiding Giants: a trained steering controller (Hegazy et al. 2025)", cfg, sections, metrics)
    print(f"wrote {report}")
    return out, metrics


if __name__ == "__main__":
    main()
