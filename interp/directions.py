"""Direction arithmetic: difference of means at every (layer, position) in one pass, vector operations, PCA,
and scoring candidate directions by ablation and addition (as one sweep each).

    harmful, harmless = model.tokenize(chat(harmful_texts)), model.tokenize(chat(harmless_texts))
    diffs = diff_of_means(model, harmful, harmless, PostInstruction())      # [L, P, D]
    abl, add = score_directions(model, diffs.reshape(-1, D), layers, metric, harmful_val, harmless_val)
"""

from __future__ import annotations

from typing import Sequence

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from interp import progress as progresslib
from interp.interventions import RESID_SITES, AddVector, AlongDirection, StackedWhere
from interp.positions import Selector, gather
from interp.sweeps import Metric, sweep
import models
from models.checks import check_call, check_index
from models.errors import InputError
from models.sites import SITES, check_site

__all__ = [
    "combine", "component", "cosine", "cosine_matrix", "diff_of_means", "mean_activations", "normalize",
    "orthogonalize", "pca", "remove_component", "score_directions",
]


# ----------------------------------------------------------------------------- vector operations


def normalize(v: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """Unit vectors along `axis`."""
    v = jnp.asarray(v, jnp.float32)
    return v / jnp.maximum(jnp.linalg.norm(v, axis=axis, keepdims=True), eps)


def component(x: Array, d: Array) -> Array:
    """The scalar projection `x . d_hat` (broadcasting over leading axes)."""
    return jnp.sum(jnp.asarray(x, jnp.float32) * normalize(d), -1)


def remove_component(x: Array, d: Array) -> Array:
    """`x` with its component along `d` removed: `x - (x . d_hat) d_hat`."""
    return jnp.asarray(x, jnp.float32) - component(x, d)[..., None] * normalize(d)


def orthogonalize(a: Array, *others: Array) -> Array:
    """`a` made orthogonal to every vector in `others` (Gram-Schmidt, so it is orthogonal to their span)."""
    basis: list[Array] = []
    for o in others:
        for b in basis:
            o = remove_component(o, b)
        basis.append(o)
    for b in basis:
        a = remove_component(a, b)
    return a


def cosine(a: Array, b: Array, axis: int = -1) -> Array:
    """Cosine similarity along `axis` (broadcasting)."""
    return jnp.sum(normalize(a, axis) * normalize(b, axis), axis)


def cosine_matrix(directions: Float[Array, "N D"]) -> Float[Array, "N N"]:
    """Pairwise cosine similarities, e.g. of one direction per layer."""
    u = normalize(directions)
    return u @ u.T


def combine(directions: Float[Array, "K D"], weights=None) -> Float[Array, " D"]:
    """The unit vector along `sum_k weights[k] * d_hat_k` (equal weights by default)."""
    u = normalize(directions)
    w = jnp.ones(u.shape[0]) if weights is None else jnp.asarray(weights, jnp.float32)
    return normalize(w @ u)


def pca(x: Float[Array, "N D"], k: int, center: bool = True) -> tuple[Float[Array, "k D"], Float[Array, " k"]]:
    """The top-`k` principal directions of the rows of `x` (e.g. paired differences `a - b`) and the fraction
    of variance each explains. Signs are fixed so each component has a non-negative mean projection."""
    x = jnp.asarray(x, jnp.float32)
    xc = x - x.mean(0) if center else x
    _, s, vt = jnp.linalg.svd(xc, full_matrices=False)
    comps = vt[:k]
    comps = comps * jnp.where(jnp.mean(x @ comps.T, 0) < 0, -1.0, 1.0)[:, None]
    return comps, (s**2 / jnp.sum(s**2))[:k]


# ----------------------------------------------------------------------------- difference of means


@eqx.filter_jit
def _selected(model, tokens, mask, idx, site: str):
    """The site at the selected positions: `[L, B, P, ...]` (or `[B, P, ...]` for model sites)."""
    act = models.forward(model, tokens, mask, None, (site,)).acts[site]
    seq_axis = 2 if SITES[site].per_layer else 1
    return gather(act, idx, seq_axis), gather(mask, idx)


def _left_pad(tokens: np.ndarray, mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    extra = width - tokens.shape[1]
    return np.pad(tokens, ((0, 0), (extra, 0))), np.pad(mask, ((0, 0), (extra, 0)))


def mean_activations(model, tokens, mask, selector: Selector, site: str = "resid_pre", *,
                     batch_size: int | None = None, progress: bool | None = None) -> Array:
    """Mean of `site` over the prompts at each selected position: `[L, P, ...]` (`[P, ...]` for model sites),
    padding excluded. `progress`: a bar over the batches (see `interp.progress`)."""
    return _group_means(model, np.asarray(tokens), np.asarray(mask), selector, site, batch_size, progress=progress)[0]


def _group_means(model, tokens, mask, selector, site, batch_size, groups=None, progress=None) -> Array:
    """Mean of the selected activations for each group of rows, `[G, L, P, ...]`, in batches of `batch_size` rows."""
    check_site(site)
    check_call(model.cfg, tokens, mask)
    groups = np.zeros(len(tokens), np.int64) if groups is None else groups
    eye = np.eye(int(groups.max()) + 1, dtype=np.float32)
    idx = np.asarray(selector(tokens, mask, model))
    step = batch_size or len(tokens)
    sums = counts = 0.0
    for lo in progresslib.iterate(range(0, len(tokens), step), f"{site} means", progress, unit="batch"):
        rows = slice(lo, lo + step)
        acts, valid = _selected(model, jnp.asarray(tokens[rows]), jnp.asarray(mask[rows]), jnp.asarray(idx[rows]), site)
        acts = jnp.moveaxis(acts, 1, 0) if SITES[site].per_layer else acts[:, None]  # [b, L, P, ...]
        w = jnp.asarray(eye[groups[rows]])[:, :, None] * valid[:, None, :].astype(jnp.float32)  # [b, G, P]
        sums = sums + jnp.einsum("bgp,blp...->glp...", w, acts)
        counts = counts + jnp.sum(w, 0)[:, None, :]
    means = sums / jnp.maximum(counts, 1e-9).reshape(counts.shape + (1,) * (sums.ndim - 3))
    return means if SITES[site].per_layer else means[:, 0]


def diff_of_means(model, a: tuple, b: tuple, selector: Selector, site: str = "resid_pre", *,
                  batch_size: int | None = None, progress: bool | None = None) -> Array:
    """`mean(site | a) - mean(site | b)` at every layer and selected position, `[L, P, ...]`, from one forward
    over both prompt sets (`a`, `b` are `(tokens, mask)`, re-padded to a common length)."""
    (ta, ma), (tb, mb) = (tuple(np.asarray(x) for x in s) for s in (a, b))
    width = max(ta.shape[1], tb.shape[1])
    ta, ma = _left_pad(ta, ma, width)
    tb, mb = _left_pad(tb, mb, width)
    groups = np.r_[np.zeros(len(ta), np.int64), np.ones(len(tb), np.int64)]
    means = _group_means(model, np.concatenate([ta, tb]), np.concatenate([ma, mb]), selector, site, batch_size, groups,
                         progress)
    return means[0] - means[1]


# ----------------------------------------------------------------------------- choosing a direction


def score_directions(model, directions: Float[Array, "N D"], layers: Sequence[int], metric: Metric, ablate_on: tuple,
                     add_on: tuple, *, positions="metric", mesh=None, batch_size=None, max_programs="auto",
                     ablation_sites: Sequence[str] = RESID_SITES, progress: bool | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Score N candidate directions (e.g. `diff_of_means` at every (layer, position), flattened) as two sweeps:

    ablation: `metric` on the `ablate_on` prompts `(tokens, mask)` with the (normalised) direction projected
      out of every residual site at every layer (e.g. refusal score on harmful prompts: should drop);
    addition: `metric` on the `add_on` prompts with the (raw) direction added to `resid_pre` of its layer
      `layers[i]` at every position (refusal score on harmless prompts: should rise).
    Returns `(ablation [N], addition [N])` metric values. `batch_size` / `max_programs` / `progress` as in `sweep`.
    """
    d = jnp.asarray(directions, jnp.float32)
    n = d.shape[0]
    if len(layers) != n:
        raise InputError(f"{n} directions but {len(layers)} layers")
    check_index("score_directions layers", np.asarray(layers), model.cfg.n_layers, f"a model of {model.cfg.n_layers} layers")
    zeros = jnp.zeros(n)
    ablate = tuple(AlongDirection(s, d, zeros, zeros) for s in ablation_sites)
    add = AddVector("resid_pre", d, jnp.ones(n), where=StackedWhere(layers=np.asarray(layers)[:, None]))
    kw = dict(positions=positions, mesh=mesh, batch_size=batch_size, progress=progress)
    return (sweep(model, *ablate_on, metric, ablate, first=np.zeros(n, np.int64), **kw),
            sweep(model, *add_on, metric, (add,), max_programs=max_programs, **kw))
