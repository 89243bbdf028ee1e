"""Contrastive layer search: how different two paired activation sets are at every layer, by several criteria.

    s = contrast.layer_scores(pos, neg)              # pos, neg: [L, n, D], row i of each from the same prompt
    s.js, s.js_authors, s.auroc                      # [L] each
    layer = contrast.select(s, "js", layers=range(L // 2))

Criteria (Wang & Shu 2024, "Trojan Activation Attack", pick the layer where the two sets differ most):

- `js`: the Jensen-Shannon divergence (nats, in [0, log 2]) between the softmax over the hidden dimension of
  each pair, averaged over pairs.
- `js_authors`: the authors' code (`F.kl_div(p, M)` with probabilities `p` where log-probabilities are expected,
  means over the hidden dimension and pairs). Since `kl_div(x, t) = t (log t - x)`, it reduces to
  `mean(M log M - M**2)` with `M = (p + q) / 2`: a function of the mixture alone, not a divergence (it is
  non-zero for identical sets). Kept for comparison with their layer choice.
- `auroc`: validation AUROC of a logistic probe per layer (`interp.probes.train`, seeded split *by pair*: row i
  of `a` and row i of `b` always land in the same part, so the probe never sees one member of a pair in training
  and the other, with the opposite label, in validation), and its test AUROC (`auroc_test`); ties are broken by
  the validation Brier score, as `probes.train` does.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import jax.scipy.special
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from interp import probes
from models.errors import InputError

__all__ = ["CRITERIA", "LayerScores", "authors_js", "layer_scores", "select", "softmax_js"]

CRITERIA = ("js", "js_authors", "auroc")


class LayerScores(NamedTuple):
    """Per-layer separation scores of a paired contrast set (`layer_scores`), each `[L]`."""
    js: np.ndarray  # [L] true Jensen-Shannon divergence of the softmax-normalised activations (nats)
    js_authors: np.ndarray  # [L] the authors' variant
    auroc: np.ndarray  # [L] probe validation AUROC
    auroc_test: np.ndarray  # [L] probe test AUROC
    brier: np.ndarray  # [L] probe validation Brier score (tie-break for `auroc`)


def _check(a, b) -> tuple[Array, Array]:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.ndim != 3 or a.shape != b.shape:
        raise InputError(f"activation sets must both be [layers, n, d] of the same shape, got {a.shape} and {b.shape}")
    if a.shape[1] < 1:
        raise InputError("activation sets need at least one pair (n >= 1)")
    for name, x in (("a", a), ("b", b)):
        if not bool(jnp.all(jnp.isfinite(x))):
            raise InputError(f"activation set {name} holds NaN or Inf: scores of undefined activations would read "
                             "as chance")
    return a, b


@jax.jit
def _js(a, b):
    lp, lq = jax.nn.log_softmax(a, -1), jax.nn.log_softmax(b, -1)
    lm = jnp.logaddexp(lp, lq) - jnp.log(2.0)
    kl = lambda l: jnp.sum(jnp.exp(l) * (l - lm), -1)
    return jnp.mean(0.5 * (kl(lp) + kl(lq)), -1)


@jax.jit
def _js_authors(a, b):
    p, q = jax.nn.softmax(a, -1), jax.nn.softmax(b, -1)
    m = 0.5 * (p + q)
    kl_div = lambda x: jax.scipy.special.xlogy(m, m) - m * x  # torch's kl_div(x, m, reduction="none"), 0 where m = 0
    return jnp.mean(0.5 * (jnp.mean(kl_div(p), -1) + jnp.mean(kl_div(q), -1)), -1)


def softmax_js(a: Float[ArrayLike, "L n D"], b: Float[ArrayLike, "L n D"]) -> np.ndarray:
    """Mean over pairs of JS(softmax(a[l, i]) || softmax(b[l, i])) per layer, `[L]` (nats)."""
    return np.asarray(_js(*_check(a, b)), np.float64)


def authors_js(a: Float[ArrayLike, "L n D"], b: Float[ArrayLike, "L n D"]) -> np.ndarray:
    """The authors' "JS" score per layer, `[L]` (probabilities passed to `kl_div` as log-probabilities)."""
    return np.asarray(_js_authors(*_check(a, b)), np.float64)


def layer_scores(a: Float[ArrayLike, "L n D"], b: Float[ArrayLike, "L n D"], *, seed: int = 0, C: float = 1.0,
                 fractions=(0.6, 0.2, 0.2)) -> LayerScores:
    """Every criterion for every layer in one call: `a` and `b` are paired activations `[L, n, D]` (label 1 for `b`
    in the probes, so a probe AUROC above 0.5 means `b` scores higher). The probes split the `n` *pairs* (seeded,
    `fractions` train / val / test, `interp.probes.train(groups=...)`): both members of a pair share a part, so
    every part needs pairs (n >= 5 with the default fractions)."""
    a, b = _check(a, b)
    n = a.shape[1]
    sizes = np.diff(np.r_[0, np.round(np.cumsum(np.asarray(fractions, np.float64)) * n)])
    if n < 3 or np.any((np.asarray(fractions) > 0) & (sizes < 1)):
        raise InputError(f"layer_scores needs enough pairs for every part of the split: n={n} pairs with fractions "
                         f"{tuple(fractions)} gives {sizes.astype(int).tolist()} pairs per part")
    x = np.concatenate([np.asarray(a), np.asarray(b)], 1)[:, :, None]  # [L, 2n, 1, D]
    y = np.r_[np.zeros(n), np.ones(n)]
    grid = probes.train(x, y, C=C, seed=seed, fractions=fractions, groups=np.r_[np.arange(n), np.arange(n)])
    val, test = grid.metrics["val"], grid.metrics["test"]
    return LayerScores(softmax_js(a, b), authors_js(a, b), val["auroc"][:, 0], test["auroc"][:, 0], val["brier"][:, 0])


def select(scores: LayerScores, criterion: str, layers: Sequence[int] | None = None) -> int:
    """The layer (among `layers`, default all) with the largest score of `criterion` ("js", "js_authors",
    "auroc"; "auroc" ties go to the lower validation Brier score)."""
    if criterion not in CRITERIA:
        raise InputError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    L = len(scores.js)
    cand = np.arange(L) if layers is None else np.asarray(list(layers), np.int64)
    if cand.size == 0:
        raise InputError("layers selects no layer")
    bad = cand[(cand < 0) | (cand >= L)]
    if bad.size:
        raise InputError(f"layers {bad.tolist()} out of range [0, {L})")
    v = np.asarray(getattr(scores, criterion), np.float64)[cand]
    if not np.isfinite(v).any():
        raise InputError(f"criterion {criterion!r} is not finite at any of the layers {cand.tolist()}")
    v = np.nan_to_num(v, nan=-np.inf)
    tied = v >= v.max() - 1e-12
    if criterion == "auroc":
        brier = np.where(tied, np.nan_to_num(scores.brier[cand], nan=np.inf), np.inf)
        return int(cand[np.argmin(brier)])
    return int(cand[np.argmax(tied)])
