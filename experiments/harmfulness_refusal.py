"""Harmfulness and refusal are encoded separately (Zhao et al. 2025), reproduced with interp's transforms.

    python -m experiments.harmfulness_refusal [--model NAME_OR_DIR] [--n-train 64] [--system-prompt "..."]

Two directions per layer from harmful - harmless differences of means of `resid_pre`: the harmfulness direction
at t_inst (the last instruction token) and the refusal direction at t_post-inst (the last prompt token; the
paper derives it from refused vs complied prompts, which a model that rarely refuses cannot supply). Then:
their cosine per layer; the Latent Guard classifier (belief score = mean over layers of cos(h, harmful centroid)
- cos(h, harmless centroid) at t_inst, harmful if > 0) on held-out HarmBench and StrongREJECT vs harmless
prompts, against a keyword baseline and a linear probe at the best (layer, position) cell; and steering
harmless prompts with each direction (and a random one) over a grid of layers x coefficients in one vmapped
sweep, with greedy refusal rates at the layer where the refusal direction acts most.

Surface form (issue 21): the harmless sets are matched to each harmful source on surface form by default
(`interp.data.matched_pairs`: HarmBench-style imperatives without trailing punctuation for training and the
HarmBench test, StrongREJECT-style questions and requests for the StrongREJECT test). Every classifier is
reported beside a surface-only baseline (length, trailing punctuation, final token), on a rerun with trailing
punctuation removed on both sides, and on the original, confounded harmless set; a result survives only if it
beats the surface baseline in both of the first two. Cosines of a zero-norm direction are undefined, not 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import models
from experiments.common import (RefusalScore, chat_texts, fmt, instruction_splits, parse_config, refusal_rate,
                                refusal_token_ids, run_dir, safe_cosine, save_figure, surface_baseline, surface_table,
                                survives, undefined_to_none, write_report)
from interp import data, probes
from interp.directions import cosine, normalize
from interp.interventions import AddVector, StackedWhere
from interp.positions import FromEnd, LastInstruction
from interp.sweeps import baseline, sweep
from models.errors import check_field

HARMLESS_STYLES = ("matched", "original", "harmbench", "strongreject")  # interp.data.harmless_instructions

# Words that flag a request as harmful for the keyword baseline (lower-case substrings).
HARM_KEYWORDS = (
    "kill", "murder", "bomb", "explosive", "weapon", "gun", "poison", "toxin", "nerve agent", "drug", "meth",
    "cocaine", "fentanyl", "hack", "malware", "ransomware", "phishing", "exploit", "steal", "fraud", "scam",
    "launder", "counterfeit", "smuggl", "illegal", "attack", "terror", "suicide", "self-harm", "harass",
    "blackmail", "extort", "racist", "hate", "abuse", "violent", "violence", "torture", "kidnap", "traffick",
)


@dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"  # any local instruct model: registered name, .gguf or HF directory
    n_train: int = 96  # per class (HarmBench train split; harmless train split)
    n_test: int = 40  # per held-out set (HarmBench test split, StrongREJECT, harmless test split)
    system_prompt: str = ""  # prepended as a system message ("" = none)
    steer_layer_stride: int = 3  # steer at every k-th layer
    coefficients: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # multiples of the refusal direction's norm at the layer
    max_new_tokens: int = 32  # greedy tokens per generation (refusal rates)
    batch_size: int = 16  # sweep items per vmapped chunk (memory)
    seed: int = 0  # data splits and random controls
    harmless: str = "matched"  # harmless sets: "matched" to each source on surface form, or "original" (confounded)
    steer: bool = True  # run the steering sweep and generations (false: directions and classifiers only)
    out: str = "runs"  # reports go to OUT/<experiment>/<timestamp>/

    def __post_init__(self):
        for name in ("n_train", "n_test", "steer_layer_stride", "max_new_tokens", "batch_size"):
            check_field(name, getattr(self, name), lo=1, integer=True)
        check_field("seed", self.seed, lo=0, integer=True)
        check_field("coefficients", self.coefficients, each=True)
        check_field("harmless", self.harmless, choices=HARMLESS_STYLES)


def keyword_scores(prompts) -> np.ndarray:
    """Number of harm keywords in each prompt (the baseline classifier says harmful when > 0)."""
    return np.array([sum(k in p.lower() for k in HARM_KEYWORDS) for p in prompts], np.float64)


def latent_guard(acts: np.ndarray, harmful_centroids: np.ndarray, harmless_centroids: np.ndarray) -> np.ndarray:
    """Belief scores `[N]`: mean over layers of cos(h_l, harmful_l) - cos(h_l, harmless_l); `acts` `[L, N, D]`."""
    h = jnp.asarray(acts)
    score = cosine(h, jnp.asarray(harmful_centroids)[:, None]) - cosine(h, jnp.asarray(harmless_centroids)[:, None])
    return np.asarray(jnp.mean(score, 0), np.float64)


def _classify(scores: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    return dict(accuracy=float(np.mean((scores > threshold) == (y == 1))), auroc=float(probes.auroc(scores, y)))


# each held-out harmful set and the harmless test set it is scored against
HELD_OUT = {"test_harmbench": "test_harmless", "test_strongreject": "test_harmless_strongreject"}


def _sets(cfg: Config, harmless: str | None = None, normalise: bool = False) -> dict:
    """Training (HarmBench train split vs harmless) and held-out prompt sets. With matched harmless sets the
    StrongREJECT prompts are scored against StrongREJECT-style harmless prompts (a form never seen in training,
    like StrongREJECT itself); with "original" both held-out sets share the one harmless test split.
    `normalise`: trailing punctuation removed from every prompt."""
    harmless = harmless or cfg.harmless
    harm_bench, safe = instruction_splits(cfg.seed, (cfg.n_train, 0, cfg.n_test), "harmbench", harmless, normalise)
    safe_sr = instruction_splits(cfg.seed, (0, 0, cfg.n_test), "strongreject", harmless, normalise)[1][2]
    strongreject = data.split(data.harmful_instructions("strongreject"), (1.0,), seed=cfg.seed)[0][: cfg.n_test]
    if normalise:
        strongreject = data.normalise_punctuation(strongreject)
    return dict(train_harmful=harm_bench[0], train_harmless=safe[0], test_harmbench=harm_bench[2],
                test_strongreject=strongreject, test_harmless=safe[2], test_harmless_strongreject=safe_sr)


def directions_and_classifiers(m, cfg: Config, sets: dict) -> dict:
    """Directions, cosines, Latent Guard / keyword / probe classification on the held-out sets."""
    system = cfg.system_prompt or None
    sel = (LastInstruction(), FromEnd(0))  # t_inst, t_post-inst
    get = lambda name: probes.collect(m, chat_texts(m, sets[name], system), sel, site="resid_pre",
                                      batch_size=cfg.batch_size)  # [L, N, 2, D]
    acts = {name: get(name) for name in sets}
    mu_harm, mu_safe = acts["train_harmful"].mean(1), acts["train_harmless"].mean(1)  # [L, 2, D]
    diffs = mu_harm - mu_safe
    harmfulness, refusal = diffs[:, 0], diffs[:, 1]  # [L, D] each
    cos = safe_cosine(harmfulness, refusal)  # NaN where a direction is zero (layer 0 at the last prompt token)

    train = np.concatenate([acts["train_harmful"], acts["train_harmless"]], 1)
    y_train = np.r_[np.ones(len(sets["train_harmful"])), np.zeros(len(sets["train_harmless"]))]
    grid = probes.train(train, y_train, seed=cfg.seed, positions=["t_inst", "t_post-inst"], site="resid_pre")
    probe = grid.probes.cell(*grid.best)
    results = {}
    for held_out, neg in HELD_OUT.items():
        x = np.concatenate([acts[held_out], acts[neg]], 1)
        y = np.r_[np.ones(len(sets[held_out])), np.zeros(len(sets[neg]))]
        guard = latent_guard(x[:, :, 0], mu_harm[:, 0], mu_safe[:, 0])
        kw = keyword_scores(sets[held_out] + sets[neg])
        probe_logit = np.asarray(probe.logits(x[grid.best[0], :, grid.best[1]]), np.float64)
        results[held_out] = {"Latent Guard": _classify(guard, y, 0.0), "keyword baseline": _classify(kw, y, 0.0),
                             "linear probe": _classify(probe_logit, y, 0.0),
                             "surface baseline": surface_baseline(sets["train_harmful"], sets["train_harmless"],
                                                                  sets[held_out], sets[neg]),
                             "_guard_scores": guard, "_y": y}
    return dict(harmfulness=harmfulness, refusal=refusal, cosine=cos, classification=results,
                probe_cell=f"layer {grid.best[0]}, {probe.positions[0]}",
                probe_val_auroc=float(grid.metrics["val"]["auroc"][grid.best]))


def steering(m, cfg: Config, sets: dict, harmfulness: np.ndarray, refusal: np.ndarray, metric, key) -> dict:
    """Refusal score on harmless test prompts with each direction added at each (layer, coefficient), one sweep;
    then greedy refusal rates at the layer where the refusal direction raises the score most."""
    system = cfg.system_prompt or None
    L, D = refusal.shape
    layers = np.arange(0, L, cfg.steer_layer_stride)
    coefs = np.asarray(cfg.coefficients, np.float64)
    norms = np.linalg.norm(refusal[layers], axis=-1)  # every direction gets the refusal direction's norm
    rand = np.asarray(normalize(jax.random.normal(key, (len(layers), D))))
    units = {"harmfulness": np.asarray(normalize(jnp.asarray(harmfulness[layers]))),
             "refusal": np.asarray(normalize(jnp.asarray(refusal[layers]))), "random": rand}
    names = list(units)
    vecs = np.stack([units[n] * norms[:, None] for n in names])  # [K, nL, D]
    K, nL, C = len(names), len(layers), len(coefs)
    vec = np.broadcast_to(vecs[:, :, None], (K, nL, C, D)).reshape(-1, D)
    scale = np.broadcast_to(coefs, (K, nL, C)).reshape(-1)
    item_layers = np.broadcast_to(layers[None, :, None], (K, nL, C)).reshape(-1)
    texts = chat_texts(m, sets["test_harmless"], system)
    tokens, mask = m.tokenize(texts)
    add = AddVector("resid_pre", vec, scale, where=StackedWhere(layers=item_layers[:, None]))
    base = baseline(m, tokens, mask, metric)
    scores = sweep(m, tokens, mask, metric, (add,), batch_size=cfg.batch_size).reshape(K, nL, C)
    # a layer where the refusal direction is zero (layer 0: the last prompt token is the same in every prompt)
    # scales every direction to zero: its effect is undefined, not 0
    degenerate = norms <= 1e-4 * norms.max()
    scores = np.where(degenerate[None, :, None], np.nan, scores)

    best = int(np.nanargmax(scores[names.index("refusal"), :, -1]))
    layer = int(layers[best])
    rates = {"base": refusal_rate(models.generate(m, texts, cfg.max_new_tokens))}
    samples = {}
    for k, n in enumerate(names):
        for c, coef in enumerate(coefs):
            steer = AddVector("resid_pre", vecs[k, best], coef, layers=(layer,))
            out = models.generate(m, texts, cfg.max_new_tokens, interventions=(steer,))
            rates[f"{n} x{coef:g}"] = refusal_rate(out)
            if c == C - 1:
                samples[n] = out[:2]
    return dict(layers=layers, coefs=coefs, names=names, scores=scores, base=base, gen_layer=layer, rates=rates,
                samples=samples, degenerate_layers=[int(l) for l in layers[degenerate]])


def _mark_undefined(ax, x, label: bool = True):
    """Mark undefined (zero-norm) points on the x axis with a red cross instead of plotting them as 0."""
    if len(x):
        ax.plot(x, np.zeros(len(x)), "x", color="red", ms=8, mew=2, label="undefined (zero-norm direction)" if label else None)


def _figures(out, variants: dict, steer: dict | None):
    """`variants`: label -> result of `directions_and_classifiers` (the first is the main run); `steer` None: no
    steering figure."""
    res = next(iter(variants.values()))
    fig = Figure(figsize=(7, 3.8))
    ax = fig.add_subplot()
    for i, (label, r) in enumerate(variants.items()):
        ax.plot(range(len(r["cosine"])), r["cosine"], marker="o", ms=3, label=label, ls="-" if i == 0 else "--")
    _mark_undefined(ax, np.flatnonzero(~np.isfinite(res["cosine"])))
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="layer", ylabel="cosine", ylim=(-1, 1),
           title="harmfulness (t_inst) vs refusal (t_post-inst) direction")
    ax.legend(fontsize=7)
    save_figure(fig, out / "cosine.png")

    fig = Figure(figsize=(9, 3.5))
    for i, name in enumerate(("test_harmbench", "test_strongreject")):
        ax = fig.add_subplot(1, 2, i + 1)
        r = res["classification"][name]
        s, y = r["_guard_scores"], r["_y"]
        bins = np.linspace(s.min(), s.max(), 25)
        ax.hist(s[y == 0], bins, alpha=0.6, label="harmless")
        ax.hist(s[y == 1], bins, alpha=0.6, label=name.removeprefix("test_"))
        ax.axvline(0, color="k", lw=0.8)
        ax.set(xlabel="Latent Guard belief score", ylabel="prompts", title=name.removeprefix("test_"))
        ax.legend(fontsize=8)
    save_figure(fig, out / "latent_guard.png")

    if steer is None:
        return
    fig = Figure(figsize=(12, 3.5))
    for k, name in enumerate(steer["names"]):
        ax = fig.add_subplot(1, len(steer["names"]), k + 1)
        for c, coef in enumerate(steer["coefs"]):
            ax.plot(steer["layers"], steer["scores"][k, :, c] - steer["base"], marker="o", ms=3, label=f"x{coef:g}")
        _mark_undefined(ax, steer["degenerate_layers"])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="steered layer", ylabel="Δ refusal score (harmless)", title=f"{name} direction")
        ax.legend(fontsize=7)
    ymin = min(a.get_ylim()[0] for a in fig.axes)
    ymax = max(a.get_ylim()[1] for a in fig.axes)
    for a in fig.axes:
        a.set_ylim(ymin, ymax)
    save_figure(fig, out / "steering.png")


def _steering_report(steer: dict, n_prompts: int) -> tuple[str, dict]:
    """The steering section's markdown and metrics."""
    names, coefs = steer["names"], steer["coefs"]
    at = list(steer["layers"]).index(steer["gen_layer"])
    steer_rows = "| direction | " + " | ".join(f"x{c:g}" for c in coefs) + " |\n|---|" + "---|" * len(coefs) + "\n"
    steer_rows += "\n".join(f"| {n} | " + " | ".join(f"{fmt(steer['scores'][k, at, c] - steer['base'], '+.2f')} / "
                                                   f"{steer['rates'][f'{n} x{coef:g}']:.2f}"
                                                   for c, coef in enumerate(coefs)) + " |"
                            for k, n in enumerate(names))
    top = coefs[-1]
    d_ref = steer["scores"][names.index("refusal"), at, -1] - steer["base"]
    d_harm = steer["scores"][names.index("harmfulness"), at, -1] - steer["base"]
    d_rand = steer["scores"][names.index("random"), at, -1] - steer["base"]
    rates = steer["rates"]
    behaviour = max(abs(rates[f"{n} x{top:g}"] - rates["base"]) for n in ("refusal", "harmfulness")) >= 0.1
    finding = (f"At layer {steer['gen_layer']} and x{top:g}, the refusal direction moves the refusal score by "
               f"{d_ref:+.2f}, the harmfulness direction by {d_harm:+.2f} and a random direction of the same norm by "
               f"{d_rand:+.2f}. " + ("The refusal direction moves refusal more than the harmfulness direction, as in "
                                     "the paper" if d_ref > d_harm else
                                     "**Unlike the paper**, the refusal direction does not move refusal more than the "
                                     "harmfulness direction here") +
               (", and more than the random control." if d_ref > d_rand else
                "; **but the random control moves it at least as much**, so neither direction's effect is specific "
                "on this model.") +
               (" Refusal rates change by at least 10 points." if behaviour else
                " **No behavioural effect**: greedy refusal rates change by less than 10 points (this model rarely "
                "refuses); the score changes are the representational effect."))
    text = (f"Baseline refusal score (log-odds of a refusal opening) on {n_prompts} harmless test prompts: "
            f"{steer['base']:.2f}; greedy refusal rate {rates['base']:.2f}. Each direction is scaled to the refusal "
            f"direction's norm at the layer times the coefficient (undefined at layer(s) {steer['degenerate_layers']}, "
            f"where that norm is 0). Table: Δ refusal score / refusal rate at layer {steer['gen_layer']} (the layer "
            f"where the refusal direction raises the score most at x{top:g}).\n\n" + steer_rows + f"\n\n{finding}"
            "\n\n![steering](steering.png)")
    metrics = dict(steering=dict(layers=[int(l) for l in steer["layers"]], coefficients=[float(c) for c in coefs],
                                 base=steer["base"], delta={n: steer["scores"][k] - steer["base"] for k, n in enumerate(names)},
                                 undefined_layers=steer["degenerate_layers"], generation_layer=steer["gen_layer"],
                                 refusal_rates=rates),
                   behavioural_effect=bool(behaviour))
    return text, metrics


def main(argv=None, cfg: Config | None = None):
    cfg = cfg or parse_config(Config, argv, __doc__)
    out = run_dir("harmfulness_refusal", cfg.out)
    m = models.load(cfg.model)
    metric = RefusalScore(jnp.asarray(refusal_token_ids(m)))
    sets = _sets(cfg)
    res = directions_and_classifiers(m, cfg, sets)
    # robustness: trailing punctuation removed on both sides; and the confounded original harmless set
    variants = {f"{cfg.harmless} harmless": res,
                "punctuation normalised": directions_and_classifiers(m, cfg, _sets(cfg, normalise=True))}
    if cfg.harmless != "original":
        variants["original harmless (confounded)"] = directions_and_classifiers(m, cfg, _sets(cfg, "original"))
    steer = (steering(m, cfg, sets, res["harmfulness"], res["refusal"], metric, jax.random.PRNGKey(cfg.seed))
             if cfg.steer else None)
    _figures(out, variants, steer)

    cos = res["cosine"]
    strip = lambda r: {k: {n: v for n, v in c.items() if not n.startswith("_")} for k, c in r["classification"].items()}
    clfs = {label: strip(r) for label, r in variants.items()}
    clf = clfs[f"{cfg.harmless} harmless"]
    labels = list(variants)
    table = ("| held-out harmful set | classifier | " + " | ".join(f"{l}: acc / AUROC" for l in labels) + " |\n|---|---|"
             + "---|" * len(labels) + "\n")
    table += "\n".join(f"| {k.removeprefix('test_')} | {n} | "
                       + " | ".join(f"{clfs[l][k][n]['accuracy']:.3f} / {clfs[l][k][n]['auroc']:.3f}" for l in labels)
                       + " |" for k, r in clf.items() for n in r)
    norm = clfs["punctuation normalised"]
    verdicts = {f"{n} on {k.removeprefix('test_')}": survives(
        f"{n} on {k.removeprefix('test_')}", clf[k][n]["auroc"], norm[k][n]["auroc"], clf[k]["surface baseline"]["auroc"],
        norm[k]["surface baseline"]["auroc"]) for k in clf for n in ("Latent Guard", "linear probe")}
    cos_line = lambda c: (f"min {fmt(np.nanmin(c))}, median {fmt(np.nanmedian(c))}, max {fmt(np.nanmax(c))} (layer "
                          f"{int(np.nanargmax(c))})" + (f"; undefined at layer(s) {np.flatnonzero(~np.isfinite(c)).tolist()} "
                                                         "(zero-norm direction)" if not np.isfinite(c).all() else ""))
    surf = surface_table({"train harmful (HarmBench)": sets["train_harmful"], "train harmless": sets["train_harmless"],
                          "test StrongREJECT": sets["test_strongreject"],
                          "test harmless (StrongREJECT's)": sets["test_harmless_strongreject"]})
    survive_text = "\n".join(f"- {t}" for _, t in verdicts.values())
    sections = [
        ("Data", f"n = {len(sets['train_harmful'])} harmful (HarmBench train split) and {len(sets['train_harmless'])} "
                 f"harmless ({cfg.harmless} set) training prompts; held out: {len(sets['test_harmbench'])} HarmBench "
                 f"test vs {len(sets['test_harmless'])} harmless test prompts, {len(sets['test_strongreject'])} "
                 f"StrongREJECT (a source never seen in training) vs {len(sets['test_harmless_strongreject'])} harmless "
                 f"test prompts{' of its own form' if cfg.harmless == 'matched' else ''}; seed {cfg.seed}; system "
                 f"prompt: {cfg.system_prompt or '(model default)'}. Directions are harmful - harmless differences of "
                 "means of `resid_pre`; the refusal direction uses t_post-inst because this model rarely refuses, so "
                 "refused-vs-complied sets (the paper's construction) cannot be formed. Surface form of the sets "
                 "(`interp.data.surface_stats`):\n\n" + surf),
        ("Two directions", "Cosine of the harmfulness (t_inst) and refusal (t_post-inst) directions per layer:\n\n"
                           + "\n".join(f"- {label}: {cos_line(r['cosine'])}" for label, r in variants.items())
                           + "\n\nA direction of zero norm (layer 0 at the last prompt token, which is the same token "
                             "in every prompt) has no cosine; it is marked, not plotted as 0.\n\n![cosine](cosine.png)"),
        ("Latent Guard", table + f"\n\nThe probe is the best of {len(cos)} x 2 (layer, position) logistic probes by "
                                 f"validation AUROC on the training prompts ({res['probe_cell']}, val AUROC "
                                 f"{res['probe_val_auroc']:.3f}; normalised rerun: "
                                 f"{variants['punctuation normalised']['probe_cell']}); Latent Guard thresholds its "
                                 f"belief score at 0; the keyword baseline flags any of {len(HARM_KEYWORDS)} harm words; "
                                 "the surface baseline is a logistic regression on length, trailing punctuation and "
                                 "final token only (`experiments.common.surface_baseline`). Which results survive the "
                                 "surface controls:\n\n" + survive_text + "\n\n![latent guard](latent_guard.png)"),
    ]
    steer_metrics = {}
    if steer is not None:
        steer_text, steer_metrics = _steering_report(steer, len(sets["test_harmless"]))
        sections += [("Steering harmless prompts", steer_text),
                     ("Sample generations (largest coefficient)",
                      "\n".join(f"- **{n}**: {s}" for n, s in steer["samples"].items()))]
    else:
        sections.append(("Steering harmless prompts", "Not run (`--steer false`)."))
    metrics = undefined_to_none(dict(
        cosine=cos, classification=clf, probe_cell=res["probe_cell"],
        variants={label: dict(cosine=r["cosine"], classification=clfs[label], probe_cell=r["probe_cell"])
                  for label, r in variants.items()},
        survives={k: ok for k, (ok, _) in verdicts.items()},
        surface={name: data.surface_stats(t) for name, t in sets.items()}, **steer_metrics))
    report = write_report(out, "Harmfulness and refusal are encoded separately (Zhao et al. 2025)", cfg, sections, metrics)
    print(f"wrote {report}")
    return out, metrics


if __name__ == "__main__":
    main()
