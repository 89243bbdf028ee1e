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
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import models
from experiments.common import (RefusalScore, chat_texts, instruction_splits, parse_config, refusal_rate,
                                refusal_token_ids, run_dir, save_figure, write_report)
from interp import data, probes
from interp.directions import cosine, normalize
from interp.interventions import AddVector, Where
from interp.positions import FromEnd, LastInstruction
from interp.sweeps import baseline, sweep

# Words that flag a request as harmful for the keyword baseline (lower-case substrings).
HARM_KEYWORDS = (
    "kill", "murder", "bomb", "explosive", "weapon", "gun", "poison", "toxin", "nerve agent", "drug", "meth",
    "cocaine", "fentanyl", "hack", "malware", "ransomware", "phishing", "exploit", "steal", "fraud", "scam",
    "launder", "counterfeit", "smuggl", "illegal", "attack", "terror", "suicide", "self-harm", "harass",
    "blackmail", "extort", "racist", "hate", "abuse", "violent", "violence", "torture", "kidnap", "traffick",
)


@dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"
    n_train: int = 96  # per class (HarmBench train split; harmless train split)
    n_test: int = 40  # per held-out set (HarmBench test split, StrongREJECT, harmless test split)
    system_prompt: str = ""
    steer_layer_stride: int = 3  # steer at every k-th layer
    coefficients: str = "0.5,1,2,4"  # multiples of the refusal direction's norm at the layer
    max_new_tokens: int = 32
    batch_size: int = 16
    seed: int = 0
    out: str = "runs"


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


def _sets(cfg: Config):
    harm_bench, harmless = instruction_splits(cfg.seed, (cfg.n_train, 0, cfg.n_test), source="harmbench")
    strongreject = data.split(data.harmful_instructions("strongreject"), (1.0,), seed=cfg.seed)[0][: cfg.n_test]
    return dict(train_harmful=harm_bench[0], train_harmless=harmless[0], test_harmbench=harm_bench[2],
                test_strongreject=strongreject, test_harmless=harmless[2])


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
    cos = np.asarray(cosine(jnp.asarray(harmfulness), jnp.asarray(refusal)))

    train = np.concatenate([acts["train_harmful"], acts["train_harmless"]], 1)
    y_train = np.r_[np.ones(len(sets["train_harmful"])), np.zeros(len(sets["train_harmless"]))]
    grid = probes.train(train, y_train, seed=cfg.seed, positions=["t_inst", "t_post-inst"], site="resid_pre")
    probe = grid.probes.cell(*grid.best)
    results = {}
    for held_out in ("test_harmbench", "test_strongreject"):
        x = np.concatenate([acts[held_out], acts["test_harmless"]], 1)
        y = np.r_[np.ones(len(sets[held_out])), np.zeros(len(sets["test_harmless"]))]
        guard = latent_guard(x[:, :, 0], mu_harm[:, 0], mu_safe[:, 0])
        kw = keyword_scores(sets[held_out] + sets["test_harmless"])
        probe_logit = np.asarray(probe.logits(x[grid.best[0], :, grid.best[1]]), np.float64)
        results[held_out] = {"Latent Guard": _classify(guard, y, 0.0), "keyword baseline": _classify(kw, y, 0.0),
                             f"linear probe (layer {grid.best[0]}, {probe.positions[0]})": _classify(probe_logit, y, 0.0),
                             "_guard_scores": guard, "_y": y}
    return dict(harmfulness=harmfulness, refusal=refusal, cosine=cos, classification=results,
                probe_val_auroc=float(grid.metrics["val"]["auroc"][grid.best]))


def steering(m, cfg: Config, sets: dict, harmfulness: np.ndarray, refusal: np.ndarray, metric, key) -> dict:
    """Refusal score on harmless test prompts with each direction added at each (layer, coefficient), one sweep;
    then greedy refusal rates at the layer where the refusal direction raises the score most."""
    system = cfg.system_prompt or None
    L, D = refusal.shape
    layers = np.arange(0, L, cfg.steer_layer_stride)
    coefs = np.array([float(c) for c in cfg.coefficients.split(",")])
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
    add = AddVector("resid_pre", vec, scale, where=Where(layers=item_layers[:, None]))
    base = baseline(m, tokens, mask, metric)
    scores = sweep(m, tokens, mask, metric, (add,), batch_size=cfg.batch_size).reshape(K, nL, C)

    best = int(np.argmax(scores[names.index("refusal"), :, -1]))
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
                samples=samples)


def _figures(out, res: dict, steer: dict):
    L = len(res["cosine"])
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(range(L), res["cosine"], marker="o", ms=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="layer", ylabel="cosine", ylim=(-1, 1),
           title="harmfulness (t_inst) vs refusal (t_post-inst) direction")
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

    fig = Figure(figsize=(12, 3.5))
    for k, name in enumerate(steer["names"]):
        ax = fig.add_subplot(1, len(steer["names"]), k + 1)
        for c, coef in enumerate(steer["coefs"]):
            ax.plot(steer["layers"], steer["scores"][k, :, c] - steer["base"], marker="o", ms=3, label=f"x{coef:g}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="steered layer", ylabel="Δ refusal score (harmless)", title=f"{name} direction")
        ax.legend(fontsize=7)
    ymin = min(a.get_ylim()[0] for a in fig.axes)
    ymax = max(a.get_ylim()[1] for a in fig.axes)
    for a in fig.axes:
        a.set_ylim(ymin, ymax)
    save_figure(fig, out / "steering.png")


def main(argv=None, cfg: Config | None = None):
    cfg = cfg or parse_config(Config, argv, __doc__)
    out = run_dir("harmfulness_refusal", cfg.out)
    m = models.load(cfg.model)
    metric = RefusalScore(jnp.asarray(refusal_token_ids(m)))
    sets = _sets(cfg)
    res = directions_and_classifiers(m, cfg, sets)
    steer = steering(m, cfg, sets, res["harmfulness"], res["refusal"], metric, jax.random.PRNGKey(cfg.seed))
    _figures(out, res, steer)

    cos = res["cosine"]
    clf = {k: {n: v for n, v in r.items() if not n.startswith("_")} for k, r in res["classification"].items()}
    table = "| held-out harmful set (vs harmless test) | classifier | accuracy | AUROC |\n|---|---|---|---|\n"
    table += "\n".join(f"| {k.removeprefix('test_')} | {n} | {v['accuracy']:.3f} | {v['auroc']:.3f} |"
                       for k, r in clf.items() for n, v in r.items())
    names, coefs = steer["names"], steer["coefs"]
    at = list(steer["layers"]).index(steer["gen_layer"])
    steer_rows = "| direction | " + " | ".join(f"x{c:g}" for c in coefs) + " |\n|---|" + "---|" * len(coefs) + "\n"
    steer_rows += "\n".join(f"| {n} | " + " | ".join(f"{steer['scores'][k, at, c] - steer['base']:+.2f} / "
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
    sections = [
        ("Data", f"n = {len(sets['train_harmful'])} harmful (HarmBench train split) and {len(sets['train_harmless'])} "
                 f"harmless (interp's own) training prompts; held out: {len(sets['test_harmbench'])} HarmBench test, "
                 f"{len(sets['test_strongreject'])} StrongREJECT (a source never seen in training), "
                 f"{len(sets['test_harmless'])} harmless test prompts; seed {cfg.seed}; system prompt: "
                 f"{cfg.system_prompt or '(model default)'}. Directions are harmful - harmless differences of means "
                 "of `resid_pre`; the refusal direction uses t_post-inst because this model rarely refuses, so "
                 "refused-vs-complied sets (the paper's construction) cannot be formed."),
        ("Two directions", f"Cosine of the harmfulness (t_inst) and refusal (t_post-inst) directions per layer: min "
                           f"{cos.min():.2f}, median {np.median(cos):.2f}, max {cos.max():.2f} (layer "
                           f"{int(np.argmax(cos))}).\n\n![cosine](cosine.png)"),
        ("Latent Guard", table + f"\n\nThe probe is the best of {len(cos)} x 2 (layer, position) logistic probes by "
                                 f"validation AUROC ({res['probe_val_auroc']:.3f}) on the training prompts; Latent Guard "
                                 "thresholds its belief score at 0; the keyword baseline flags any of "
                                 f"{len(HARM_KEYWORDS)} harm words.\n\n![latent guard](latent_guard.png)"),
        ("Steering harmless prompts", f"Baseline refusal score (log-odds of a refusal opening) on {len(sets['test_harmless'])} "
                                      f"harmless test prompts: {steer['base']:.2f}; greedy refusal rate {rates['base']:.2f}. "
                                      f"Each direction is scaled to the refusal direction's norm at the layer times the "
                                      f"coefficient. Table: Δ refusal score / refusal rate at layer {steer['gen_layer']} "
                                      f"(the layer where the refusal direction raises the score most at x{top:g}).\n\n"
                                      + steer_rows + f"\n\n{finding}\n\n![steering](steering.png)"),
        ("Sample generations (largest coefficient)", "\n".join(f"- **{n}**: {s}" for n, s in steer["samples"].items())),
    ]
    metrics = dict(cosine=[float(c) for c in cos], classification=clf,
                   steering=dict(layers=[int(l) for l in steer["layers"]], coefficients=[float(c) for c in coefs],
                                 base=steer["base"], delta={n: (steer["scores"][k] - steer["base"]).tolist()
                                                            for k, n in enumerate(names)},
                                 generation_layer=steer["gen_layer"], refusal_rates=rates),
                   behavioural_effect=bool(behaviour))
    report = write_report(out, "Harmfulness and refusal are encoded separately (Zhao et al. 2025)", cfg, sections, metrics)
    print(f"wrote {report}")
    return out, metrics


if __name__ == "__main__":
    main()
