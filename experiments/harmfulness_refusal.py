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

Statistics (issue 39, `interp.stats`): AUROCs with bootstrap intervals over the held-out prompts, accuracies and
refusal rates with Wilson intervals; at the generation layer and the largest coefficient, each direction's per-prompt
refusal-score change against a null distribution of `n_null` random directions of the same norm (one stacked sweep,
every coefficient): as a paired difference from the null's mean and as a percentile in the null, and refusal vs
harmfulness direction as a paired difference; refusal rates steered vs unsteered as paired rates (McNemar). The
verdict is computed on the `primary` cell named in the config, Holm-corrected over `CELLS`; a "Claims" section lists
the README's claims. The probes see independent prompts (the harmful and harmless sets are separate lists, not item
pairs; the two positions are separate probe cells), so no grouped split is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import models
from experiments.common import (RefusalScore, Report, Study, chat_texts, fmt, instruction_splits, is_refusal, lap,
                                refusal_token_ids, safe_cosine, save_figure, surface_baseline, surface_table, survives)
from experiments.lib.refusal_stats import (PromptRefusalScores, as_dict, beats_null, cell_holds, check_stats_fields,
                                           primary_verdict, prompt_scores, random_like, rate_estimate)
from interp import data, probes, stats
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


# The cells the verdict scans (Holm over all of them), at the generation layer and the largest coefficient, oriented
# so that steering harmless prompts towards refusal is positive ("refusal - harmfulness" is two-sided).
CELLS = ("refusal dir vs null mean", "harmfulness dir vs null mean", "refusal dir vs null (percentile)",
         "harmfulness dir vs null (percentile)", "refusal - harmfulness (score)", "refusal dir: refusal-rate rise",
         "harmfulness dir: refusal-rate rise")


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
    n_null: int = 16  # random directions of the same norm in the steering null distribution
    primary: str = "refusal dir vs null mean"  # the verdict's comparison, one of CELLS (named before the run)
    out: str = "runs"  # reports go to OUT/<experiment>/<timestamp>/

    def __post_init__(self):
        check_stats_fields(self, CELLS)  # issue 39's fields
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


def _classify(scores: np.ndarray, y: np.ndarray, threshold: float, seed: int = 0) -> dict:
    """Accuracy at `threshold` (Wilson interval) and AUROC (bootstrap interval over the prompts)."""
    hit = (scores > threshold) == (y == 1)
    return dict(accuracy=float(np.mean(hit)), auroc=float(probes.auroc(scores, y)),
                accuracy_ci=as_dict(rate_estimate(hit)), auroc_ci=as_dict(stats.auroc(scores, y, seed=seed)))


POSITIONS = (LastInstruction(), FromEnd(-1))  # t_inst (last instruction token), t_post-inst (the last token)
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


def median_cosine(harm: np.ndarray, safe: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> stats.Estimate:
    """Median over layers of the cosine of the harmfulness (position 0) and refusal (position 1) differences of
    means, with a bootstrap interval over the training prompts (the pooled rows of both classes resampled, each
    class's mean recomputed from its resampled rows). `harm [L, Nh, 2, D]`, `safe [L, Ns, 2, D]`; layers where the
    full-sample cosine is undefined (a zero-norm direction) are left out, as in the point estimate."""
    x = np.concatenate([harm, safe], 1).astype(np.float64)  # [L, N, 2, D]
    L, N = x.shape[:2]
    y = np.r_[np.ones(harm.shape[1]), np.zeros(safe.shape[1])]
    full = safe_cosine(harm.mean(1)[:, 0] - safe.mean(1)[:, 0], harm.mean(1)[:, 1] - safe.mean(1)[:, 1])
    layers = np.flatnonzero(np.isfinite(full))

    def stat(idx, axis=0):
        rows = np.asarray(idx)[..., 0].astype(np.int64)
        rows2 = rows.reshape(-1, N)  # [B, N] resampled row indices
        counts = np.zeros((len(rows2), N))
        np.add.at(counts, (np.arange(len(rows2))[:, None], rows2), 1.0)
        w = counts * y / np.maximum((counts * y).sum(1, keepdims=True), 1) \
            - counts * (1 - y) / np.maximum((counts * (1 - y)).sum(1, keepdims=True), 1)  # [B, N]
        cos = []
        for l in layers:
            d = (w @ x[l].reshape(N, -1)).reshape(len(w), 2, -1)  # [B, 2, D]: the two differences of means
            with np.errstate(invalid="ignore", divide="ignore"):
                cos.append(np.sum(d[:, 0] * d[:, 1], -1) / np.linalg.norm(d[:, 0], axis=-1)
                           / np.linalg.norm(d[:, 1], axis=-1))
        med = np.median(np.stack(cos), 0)  # [B]
        return med if rows.ndim > 1 else med[0]

    est = stats.bootstrap(np.arange(N)[:, None], stat, n_boot=n_boot, seed=seed)
    return stats.Estimate(est.value, est.lo, est.hi, N, method=f"median over {len(layers)} layers; {est.method} "
                          "over the pooled training prompts")


def directions_and_classifiers(m, cfg: Config, sets: dict) -> dict:
    """Directions, cosines, Latent Guard / keyword / probe classification on the held-out sets."""
    system = cfg.system_prompt or None
    get = lambda name: probes.collect(m, chat_texts(m, sets[name], system), POSITIONS, site="resid_pre",
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
        results[held_out] = {"Latent Guard": _classify(guard, y, 0.0, cfg.seed),
                             "keyword baseline": _classify(kw, y, 0.0, cfg.seed),
                             "linear probe": _classify(probe_logit, y, 0.0, cfg.seed),
                             "surface baseline": surface_baseline(sets["train_harmful"], sets["train_harmless"],
                                                                  sets[held_out], sets[neg]),
                             "_guard_scores": guard, "_y": y}
    median_cos = median_cosine(acts["train_harmful"], acts["train_harmless"], seed=cfg.seed)
    return dict(harmfulness=harmfulness, refusal=refusal, cosine=cos, classification=results, median_cosine=median_cos,
                probe_cell=f"layer {grid.best[0]}, {probe.positions[0]}",
                probe_val_auroc=float(grid.metrics["val"]["auroc"][grid.best]))


def steering(m, cfg: Config, sets: dict, harmfulness: np.ndarray, refusal: np.ndarray, metric, key) -> dict:
    """Refusal score on harmless test prompts with each direction (and one random draw, for the figure) added at each
    (layer, coefficient), one sweep; at the layer where the refusal direction raises the score most: per-prompt
    scores for both directions and `n_null` random directions of the same norm at every coefficient (one stacked
    sweep, `null_sweep`), and greedy refusal flags per prompt."""
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
    pmetric = PromptRefusalScores(metric.ids)
    nulls = random_like(vecs[names.index("refusal"), best], cfg.n_null, cfg.seed)  # [K, D], the refusal norm
    null = null_sweep(m, cfg, tokens, mask, pmetric, layer, vecs[:2, best], nulls)
    refused = {"base": np.array([is_refusal(t) for t in models.generate(m, texts, cfg.max_new_tokens)])}
    samples = {}
    for k, n in enumerate(names):
        for c, coef in enumerate(coefs):
            steer = AddVector("resid_pre", vecs[k, best], coef, layers=(layer,))
            out = models.generate(m, texts, cfg.max_new_tokens, interventions=(steer,))
            refused[f"{n} x{coef:g}"] = np.array([is_refusal(t) for t in out])
            if c == C - 1:
                samples[n] = out[:2]
    rates = {k: float(v.mean()) for k, v in refused.items()}
    return dict(layers=layers, coefs=coefs, names=names, scores=scores, base=base, gen_layer=layer, rates=rates,
                refused=refused, samples=samples, degenerate_layers=[int(l) for l in layers[degenerate]], null=null)


def null_sweep(m, cfg: Config, tokens, mask, pmetric, layer: int, directions: np.ndarray, nulls: np.ndarray) -> dict:
    """Per-prompt refusal scores with each of `directions [2, D]` (harmfulness, refusal) and each null direction
    `[K, D]` added at `layer` times each coefficient, one stacked sweep: `directions [2, C, n]`, `null [K, C, n]`,
    and the unsteered `base [n]`."""
    coefs = np.asarray(cfg.coefficients, np.float64)
    vecs = np.concatenate([directions, nulls]).astype(np.float32)  # [2 + K, D]
    N, C = len(vecs), len(coefs)
    add = AddVector("resid_pre", np.repeat(vecs, C, 0), np.tile(coefs, N),
                    where=StackedWhere(layers=np.full((N * C, 1), layer)))
    out = sweep(m, tokens, mask, pmetric, (add,), batch_size=cfg.batch_size).reshape(N, C, -1)
    return dict(directions=out[:2], null=out[2:], base=prompt_scores(m, tokens, mask, pmetric))


def steering_tests(steer: dict) -> dict:
    """The cells in `CELLS` at the generation layer and the largest coefficient: per-prompt changes of the refusal
    score (steered - unsteered) against the null, refusal - harmfulness, and paired refusal rates."""
    null, top = steer["null"], steer["coefs"][-1]
    d = null["directions"][:, -1] - null["base"][None]  # [2, n]: harmfulness, refusal
    dn = null["null"][:, -1] - null["base"][None]  # [K, n]
    harm, ref = d
    g = dict(alternative="greater")
    base = steer["refused"]["base"]
    return {
        "refusal dir vs null mean": stats.paired_difference(ref, dn.mean(0), **g),
        "harmfulness dir vs null mean": stats.paired_difference(harm, dn.mean(0), **g),
        "refusal dir vs null (percentile)": stats.null_test(float(ref.mean()), dn.mean(1), "greater"),
        "harmfulness dir vs null (percentile)": stats.null_test(float(harm.mean()), dn.mean(1), "greater"),
        "refusal - harmfulness (score)": stats.paired_difference(ref, harm),
        "refusal dir: refusal-rate rise": stats.paired_rate_difference(steer["refused"][f"refusal x{top:g}"], base),
        "harmfulness dir: refusal-rate rise": stats.paired_rate_difference(steer["refused"][f"harmfulness x{top:g}"],
                                                                           base),
    }


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


def _steering_report(steer: dict, n_prompts: int, cfg: Config) -> tuple[str, dict, dict, stats.Verdict]:
    """The steering section's markdown, its metrics, the tested cells and the verdict on `cfg.primary`."""
    names, coefs = steer["names"], steer["coefs"]
    at = list(steer["layers"]).index(steer["gen_layer"])
    refused, null = steer["refused"], steer["null"]
    # per-prompt changes at the generation layer: the two directions, then the null, each coefficient
    d = {n: null["directions"][i] - null["base"][None] for i, n in enumerate(("harmfulness", "refusal"))}  # [C, n]
    dn = null["null"] - null["base"][None]  # [K, C, n]
    est = lambda x: str(stats.bootstrap(x, seed=cfg.seed))
    rows = []
    for c, coef in enumerate(coefs):
        for n in ("harmfulness", "refusal"):
            rows.append([f"{n} x{coef:g}", est(d[n][c]),
                         str(stats.null_test(float(d[n][c].mean()), dn[:, c].mean(1), "greater")),
                         str(rate_estimate(refused[f"{n} x{coef:g}"]))])
        rows.append([f"null ({dn.shape[0]} random) x{coef:g}", est(dn[:, c].mean(0)), "", ""])
        rows.append([f"random (one draw, generated) x{coef:g}",
                     fmt(steer["scores"][names.index("random"), at, c] - steer["base"], "+.2f") + " (batch mean)", "",
                     str(rate_estimate(refused[f"random x{coef:g}"]))])
    table = stats.markdown_table(["direction x coefficient", "Δ refusal score (mean over prompts)",
                                  "vs the null: percentile, band, p", "refusal rate"], rows)
    grid = stats.markdown_table(["direction"] + [f"x{c:g}" for c in coefs],
                                [[n] + [fmt(steer["scores"][k, at, c] - steer["base"], "+.2f") for c in range(len(coefs))]
                                 for k, n in enumerate(names)])
    tests = steering_tests(steer)
    v = stats.verdict(tests, cfg.primary, alternative="greater", what=cfg.primary)
    holds, verdict_text = primary_verdict(v, tests)  # with the null's percentile where the primary is a null cell
    behaviour = (cell_holds(v, tests, "refusal dir: refusal-rate rise")
                 or cell_holds(v, tests, "harmfulness dir: refusal-rate rise"))
    top = coefs[-1]
    text = (f"Baseline refusal score (log-odds of a refusal opening) on {n_prompts} harmless test prompts: "
            f"{steer['base']:.2f}; greedy refusal rate {rate_estimate(refused['base'])}. Each direction is scaled to "
            f"the refusal direction's norm at the layer times the coefficient (undefined at layer(s) "
            f"{steer['degenerate_layers']}, where that norm is 0). Every direction at layer {steer['gen_layer']} (the "
            f"layer where the refusal direction raises the batch-mean score most at x{top:g}, chosen on these same "
            "prompts, which favours the refusal direction over the null) against a null of "
            f"{dn.shape[0]} random directions of the same norm (one stacked sweep, seed {cfg.seed}); Δ is the mean "
            "per-prompt change with a bootstrap 95% interval over prompts; rates with Wilson intervals:\n\n" + table
            + f"\n\nBatch-mean Δ refusal score at layer {steer['gen_layer']} from the layer x coefficient sweep (the "
            "figure; 'random' is one draw):\n\n" + grid
            + ("\n\nA refusal rate changes significantly (paired, McNemar, Holm-corrected)." if behaviour else
               "\n\n**No detectable behavioural effect**: neither direction changes the greedy refusal rate "
               "significantly (paired, exact McNemar, Holm-corrected); the score changes are the representational "
               "effect.") + "\n\n![steering](steering.png)")
    metrics = dict(steering=dict(layers=[int(l) for l in steer["layers"]], coefficients=[float(c) for c in coefs],
                                 base=steer["base"], delta={n: steer["scores"][k] - steer["base"] for k, n in enumerate(names)},
                                 undefined_layers=steer["degenerate_layers"], generation_layer=steer["gen_layer"],
                                 refusal_rates=steer["rates"],
                                 null_delta=dn.mean(2), direction_delta={n: v_.mean(1) for n, v_ in d.items()}),
                   behavioural_effect=bool(behaviour), tests={k: as_dict(t) for k, t in tests.items()},
                   primary=cfg.primary, verdict_holds=holds, verdict=verdict_text, p_holm=v.p_holm)
    return text, metrics, tests, v


def _auc(r: dict) -> str:
    """A classifier's AUROC with its bootstrap interval (the surface baseline has none)."""
    if "auroc_ci" not in r:
        return f"{r['auroc']:.3f}"
    return str(stats.Estimate(**{k: r["auroc_ci"][k] for k in ("value", "lo", "hi", "n")}))


def _claims(cfg: Config, cos, med: stats.Estimate, clf: dict, verdicts: dict, tests: dict | None,
            v: stats.Verdict | None) -> list:
    """The README's claims for this study, each with its statistic and whether this run supports it."""
    surv = "; ".join(f"{name}: {_auc(clf[k][n])} vs surface {clf[k]['surface baseline']['auroc']:.3f}"
                     for k in clf for n in ("Latent Guard", "linear probe")
                     for name in [f"{n} on {k.removeprefix('test_')}"])
    lg, sb = clf["test_strongreject"]["Latent Guard"], clf["test_strongreject"]["surface baseline"]
    lg_acc = stats.Estimate(**{k: lg["accuracy_ci"][k] for k in ("value", "lo", "hi", "n")})
    claims = [
        stats.Claim("The harmfulness (t_inst) and refusal (t_post-inst) directions are not nearly orthogonal (median "
                    "cosine over layers above 0.2: the interval's lower end)", f"median {med}, max "
                    f"{fmt(np.nanmax(cos))} over {int(np.isfinite(cos).sum())} layers", bool(med.lo > 0.2)),
        stats.Claim("Latent Guard's and the probe's AUROCs survive the surface controls on both held-out sets",
                    surv, all(ok for ok, _ in verdicts.values())),
        stats.Claim("Latent Guard's 0-threshold accuracy on StrongREJECT does not beat the surface baseline's by 0.05",
                    f"{lg_acc} vs surface {sb['accuracy']:.3f}", bool(lg["accuracy"] - sb["accuracy"] < 0.05)),
    ]
    if tests is None:
        return claims + [stats.Claim("Steering claims", "steering not run", None)]
    d = tests["refusal - harmfulness (score)"]
    behaviour = (cell_holds(v, tests, "refusal dir: refusal-rate rise")
                 or cell_holds(v, tests, "harmfulness dir: refusal-rate rise"))
    return claims + [
        stats.Claim("The refusal direction raises harmless prompts' refusal score more than random directions of the "
                    "same norm" + (" (primary)" if cfg.primary.startswith("refusal dir vs null") else ""),
                    f"{tests['refusal dir vs null mean']}; {tests['refusal dir vs null (percentile)']}",
                    beats_null(v, tests, "refusal dir vs null mean", "refusal dir vs null (percentile)")),
        stats.Claim("The harmfulness direction raises it more than random directions of the same norm",
                    f"{tests['harmfulness dir vs null mean']}; {tests['harmfulness dir vs null (percentile)']}",
                    beats_null(v, tests, "harmfulness dir vs null mean", "harmfulness dir vs null (percentile)")),
        stats.Claim("Unlike the paper, the refusal direction moves the refusal score less than the harmfulness "
                    "direction", f"refusal - harmfulness {d} (two-sided, Holm p {v.p_holm['refusal - harmfulness (score)']:.2g})",
                    bool(v.p_holm["refusal - harmfulness (score)"] < 0.05 and d.hi < 0)),
        stats.Claim("No direction changes behaviour: refusal rates do not change detectably (paired, McNemar, Holm)",
                    f"{tests['refusal dir: refusal-rate rise']}; {tests['harmfulness dir: refusal-rate rise']}",
                    not behaviour),
    ]


def study(m, cfg: Config, out) -> Report:
    """The whole study on model `m` (figures into the folder `out`)."""
    metric = RefusalScore(jnp.asarray(refusal_token_ids(m)))
    sets = _sets(cfg)
    res = directions_and_classifiers(m, cfg, sets)
    lap("directions and classifiers")
    # robustness: trailing punctuation removed on both sides; and the confounded original harmless set
    variants = {f"{cfg.harmless} harmless": res,
                "punctuation normalised": directions_and_classifiers(m, cfg, _sets(cfg, normalise=True))}
    if cfg.harmless != "original":
        variants["original harmless (confounded)"] = directions_and_classifiers(m, cfg, _sets(cfg, "original"))
    lap("surface variants")
    steer = (steering(m, cfg, sets, res["harmfulness"], res["refusal"], metric, jax.random.PRNGKey(cfg.seed))
             if cfg.steer else None)
    lap("steering")
    _figures(out, variants, steer)

    cos = res["cosine"]
    strip = lambda r: {k: {n: v for n, v in c.items() if not n.startswith("_")} for k, c in r["classification"].items()}
    clfs = {label: strip(r) for label, r in variants.items()}
    clf = clfs[f"{cfg.harmless} harmless"]
    labels = list(variants)
    table = stats.markdown_table(["held-out harmful set", "classifier"] + [f"{l}: acc / AUROC" for l in labels],
                                 [[k.removeprefix("test_"), n]
                                  + [f"{clfs[l][k][n]['accuracy']:.3f} / {_auc(clfs[l][k][n])}" for l in labels]
                                  for k, r in clf.items() for n in r])
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
                           + "\n".join(f"- {label}: {cos_line(r['cosine'])}; median with a bootstrap 95% interval "
                                       f"over the training prompts {r['median_cosine']}" for label, r in variants.items())
                           + "\n\nA direction of zero norm (layer 0 at the last prompt token, which is the same token "
                             "in every prompt) has no cosine; it is marked, not plotted as 0.\n\n![cosine](cosine.png)"),
        ("Latent Guard", table + f"\n\nThe probe is the best of {len(cos)} x 2 (layer, position) logistic probes by "
                                 f"validation AUROC on the training prompts ({res['probe_cell']}, val AUROC "
                                 f"{res['probe_val_auroc']:.3f}; normalised rerun: "
                                 f"{variants['punctuation normalised']['probe_cell']}); Latent Guard thresholds its "
                                 f"belief score at 0; the keyword baseline flags any of {len(HARM_KEYWORDS)} harm words; "
                                 "the surface baseline is a logistic regression on length, trailing punctuation and "
                                 "final token only (`interp.probes.surface_baseline`). Which results survive the "
                                 "surface controls:\n\n" + survive_text + "\n\n![latent guard](latent_guard.png)"),
    ]
    steer_metrics, tests, v = {}, None, None
    if steer is not None:
        steer_text, steer_metrics, tests, v = _steering_report(steer, len(sets["test_harmless"]), cfg)
        sections += [("Steering harmless prompts", steer_text),
                     ("Verdict", steer_metrics["verdict"] + "\n\n" + v.table),
                     ("Sample generations (largest coefficient)",
                      "\n".join(f"- **{n}**: {s}" for n, s in steer["samples"].items()))]
    else:
        sections += [("Steering harmless prompts", "Not run (`--steer false`)."),
                     ("Verdict", f"Not computed: the primary cell ({cfg.primary}) is a steering cell.")]
    claims = _claims(cfg, cos, res["median_cosine"], clf, verdicts, tests, v)
    sections.append(("Claims", stats.claims_section(claims)))
    metrics = dict(
        cosine=cos, median_cosine=as_dict(res["median_cosine"]), classification=clf, probe_cell=res["probe_cell"],
        variants={label: dict(cosine=r["cosine"], classification=clfs[label], probe_cell=r["probe_cell"])
                  for label, r in variants.items()},
        survives={k: ok for k, (ok, _) in verdicts.items()},
        surface={name: data.surface_stats(t) for name, t in sets.items()}, **steer_metrics,
        claims=[dict(text=c.text, statistic=c.statistic, holds=c.holds) for c in claims])
    return Report(sections, metrics)


STUDY = Study("harmfulness_refusal", "Harmfulness and refusal are encoded separately (Zhao et al. 2025)", Config, study,
              __doc__)


def main(argv=None, cfg: Config | None = None):
    """`python -m experiments.harmfulness_refusal`: the run folder and its metrics."""
    return STUDY.main(argv, cfg)


if __name__ == "__main__":
    main()
