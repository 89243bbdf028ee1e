"""Interventions as data: equinox pytrees applied inside `models.forward` at a named site.

Every intervention has a static `site` (a name from `models.sites.SITES`), a `where` (`Where`: which layers,
positions, heads and decoding steps it touches) and arrays as leaves, so a tuple of them composes (applied
in order), `jax.vmap` runs a stacked batch of them as one program (`stack`), and `jax.grad` (or
`eqx.filter_grad`, which skips the integer `Where` leaves) differentiates with respect to their arrays.

    steer = AddVector("resid_pre", v, scale=4.0, layers=(6,))               # ActAdd at layer 6
    ablate = directional_ablation(r)                                         # project r out everywhere
    heads = zero_heads(cfg, [(3, 1), (5, 0)])                                # [layers, heads] mask at attn.z
    logits, _ = models.forward(m, tokens, mask, interventions=(steer, *ablate, heads))
    models.generate(m, prompts, 20, interventions=(AddVector("resid_pre", v, 4.0, layers=(6,), steps="generated"),))

Selections are computed from the traced `SiteContext`, never from Python state: `layers` compares with
`ctx.layer` (inside the layer scan), `positions` with the position ids (so they keep their meaning during
generation), `tokens` is a sequence-index mask for full passes, `steps` tells the prompt pass from decode steps.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from models.errors import InputError
from models.sites import SITES, check_site
from models.transformer import SiteContext

__all__ = [
    "AddVector", "AlongDirection", "Function", "Intervention", "RESID_SITES", "Replace", "ScaleHeads", "Where",
    "clamp_component", "directional_ablation", "first_layers", "mean_ablation", "patch", "project_out",
    "resample_ablation", "set_component", "stack", "unstack", "zero_ablation", "zero_heads",
]

RESID_SITES = ("resid_pre", "resid_mid", "resid_post")
STEPS = ("all", "prompt", "generated")


def _place(x: Array, names: tuple[str, ...], axes: tuple[str, ...]) -> Array:
    """Reshape `x` (axes `names`, in site order) so it broadcasts against a value with axes `axes`."""
    return jnp.reshape(x, [x.shape[names.index(a)] if a in names else 1 for a in axes])


def _head_axis(axes: tuple[str, ...]) -> str:
    for a in ("H", "K"):
        if a in axes:
            return a
    raise InputError(f"site with axes {axes} has no head axis; heads= needs a per-head site such as attn.z")


def _index(x, dtype=jnp.int32):
    return None if x is None else jnp.atleast_1d(jnp.asarray(x, dtype))


class Where(eqx.Module):
    """Where an intervention applies; `None` means everywhere.

    layers:    layer indices `[n]` (compared with the traced `ctx.layer`; not for `embed`/`final_norm`).
    positions: position ids `[n]` (0 = each row's first real token), also meaningful during generation.
    tokens:    `[T]` or `[B, T]` mask over the sequence axis of a full pass; passes of another length
               (decode steps) are left untouched.
    heads:     `[H]` or `[L, H]` (indexed by layer) mask over the head axis of per-head sites.
    steps:     "all", "prompt" (`ctx.step == 0`) or "generated" (decode steps of `models.generate`).
    """

    layers: Int[Array, "n"] | None = eqx.field(default=None, converter=_index)
    positions: Int[Array, "n"] | None = eqx.field(default=None, converter=_index)
    tokens: Bool[Array, "*B T"] | None = eqx.field(default=None, converter=lambda x: None if x is None else jnp.asarray(x, bool))
    heads: Bool[Array, "*L H"] | None = eqx.field(default=None, converter=lambda x: None if x is None else jnp.asarray(x, bool))
    steps: str = eqx.field(default="all", static=True)

    def __check_init__(self):
        if self.steps not in STEPS:
            raise InputError(f"steps must be one of {STEPS}, got {self.steps!r}")

    def gate(self, site: str, value: Array, ctx: SiteContext):
        """Boolean array broadcastable to `value` (True where to apply), `None` for everywhere, `False` for nowhere."""
        axes = SITES[site].axes
        conds = []
        if self.layers is not None and ctx.layer is not None:
            conds.append(jnp.any(ctx.layer == self.layers))
        if self.steps != "all":
            conds.append(ctx.step == 0 if self.steps == "prompt" else ctx.step > 0)
        tok = None
        if self.positions is not None:
            tok = jnp.any(ctx.positions[..., None] == self.positions, axis=-1)
        if self.tokens is not None:
            if self.tokens.shape[-1] != value.shape[axes.index("T")]:
                return False
            sel = jnp.broadcast_to(self.tokens, ctx.positions.shape)
            tok = sel if tok is None else tok & sel
        if tok is not None:
            conds.append(_place(tok, ("B", "T"), axes))
        if self.heads is not None:
            h = self.heads[ctx.layer] if self.heads.ndim == 2 else self.heads
            conds.append(_place(h, (_head_axis(axes),), axes))
        if not conds:
            return None
        g = conds[0]
        for c in conds[1:]:
            g = g & c
        return g


def _where(site: str, where: Where | None, kwargs: dict) -> Where:
    check_site(site)
    if where is not None and kwargs:
        raise InputError("pass either where= or its fields (layers=, positions=, ...), not both")
    w = where if where is not None else Where(**kwargs)
    if w.layers is not None and not SITES[site].per_layer:
        raise InputError(f"site {site!r} is not a layer site; layers= does not apply")
    return w


def _per_layer(x: Array, ctx: SiteContext, per_layer: bool) -> Array:
    if not per_layer:
        return x
    if ctx.layer is None:
        raise InputError("a per-layer value ([n_layers, ...]) needs a layer site")
    return x[ctx.layer]


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


class Intervention(eqx.Module):
    """Base class: subclasses hold `site`, `where` and define `edit(value, ctx)`; `apply` restricts the edit
    to `where` (exactly: untouched elements are the input values)."""

    def edit(self, value: Array, ctx: SiteContext) -> Array | None:
        raise NotImplementedError

    def apply(self, value: Array, ctx: SiteContext) -> Array:
        g = self.where.gate(self.site, value, ctx)
        if g is False:
            return value
        new = self.edit(value, ctx)
        if new is None:
            return value
        new = jnp.broadcast_to(new.astype(value.dtype), value.shape)
        return new if g is None else jnp.where(g, new, value)


class AddVector(Intervention):
    """`value + scale * vector` (ActAdd / steering). `vector` has the site's trailing shape (`[D]` for residual
    sites) or any shape broadcastable to the value; with `per_layer=True` it has a leading `[n_layers]` axis.
    `scale` is a scalar or `[n_layers]` (a per-layer scale)."""

    site: str = eqx.field(static=True)
    vector: Float[Array, "..."]
    scale: Float[Array, "*L"]
    where: Where
    per_layer: bool = eqx.field(static=True)

    def __init__(self, site: str, vector, scale=1.0, *, per_layer: bool = False, where: Where | None = None, **kw):
        self.site, self.where, self.per_layer = site, _where(site, where, kw), per_layer
        self.vector, self.scale = _f32(vector), _f32(scale)

    def edit(self, value, ctx):
        scale = _per_layer(self.scale, ctx, self.scale.ndim == 1)
        return value + scale * _per_layer(self.vector, ctx, self.per_layer)


class AlongDirection(Intervention):
    """Clamp the component of the last axis along `direction` to `[lo, hi]` (normalised inside).

    `project_out` (lo = hi = 0), `set_component` (lo = hi = c) and `clamp_component` build it. `direction` is
    `[D]` or, with `per_layer=True`, `[n_layers, D]`; `lo`/`hi` are scalars or `[n_layers]`.
    """

    site: str = eqx.field(static=True)
    direction: Float[Array, "*L D"]
    lo: Float[Array, "*L"]
    hi: Float[Array, "*L"]
    where: Where
    per_layer: bool = eqx.field(static=True)

    def __init__(self, site: str, direction, lo=0.0, hi=0.0, *, per_layer: bool = False, where: Where | None = None, **kw):
        self.site, self.where, self.per_layer = site, _where(site, where, kw), per_layer
        self.direction, self.lo, self.hi = _f32(direction), _f32(lo), _f32(hi)

    def edit(self, value, ctx):
        d = _per_layer(self.direction, ctx, self.per_layer)
        r = d / jnp.maximum(jnp.linalg.norm(d), 1e-30)  # a zero direction edits nothing
        x = value.astype(jnp.float32)
        p = x @ r
        lo = _per_layer(self.lo, ctx, self.lo.ndim == 1)
        hi = _per_layer(self.hi, ctx, self.hi.ndim == 1)
        return x + (jnp.clip(p, lo, hi) - p)[..., None] * r


def project_out(site: str, direction, **kw) -> AlongDirection:
    """Directional ablation at one site: `x - (x . r) r` with `r = direction / |direction|`."""
    return AlongDirection(site, direction, 0.0, 0.0, **kw)


def set_component(site: str, direction, value, **kw) -> AlongDirection:
    """Set the component along `direction` to `value` (scalar or `[n_layers]`)."""
    return AlongDirection(site, direction, value, value, **kw)


def clamp_component(site: str, direction, lo=-jnp.inf, hi=jnp.inf, **kw) -> AlongDirection:
    """Clamp the component along `direction` to `[lo, hi]`."""
    return AlongDirection(site, direction, lo, hi, **kw)


def directional_ablation(direction, sites: Sequence[str] = RESID_SITES, **kw) -> tuple[AlongDirection, ...]:
    """Project `direction` out of the residual stream at every layer (Arditi et al.); `sites` and the `Where`
    fields (`layers=`, `positions=`, ...) narrow it. Equals `interp.weights.orthogonalize` on the weights."""
    return tuple(project_out(s, direction, **kw) for s in sites)


class ScaleHeads(Intervention):
    """Multiply each head's output by `mask[layer, head]` (`[n_layers, n_heads]`, or `[n_heads]` for every
    layer) at a per-head site, `attn.z` by default. 0 zero-ablates; the mask is differentiable."""

    site: str = eqx.field(static=True)
    mask: Float[Array, "*L H"]
    where: Where

    def __init__(self, mask, site: str = "attn.z", *, where: Where | None = None, **kw):
        self.site, self.where, self.mask = site, _where(site, where, kw), _f32(mask)
        _head_axis(SITES[site].axes)

    def edit(self, value, ctx):
        m = _per_layer(self.mask, ctx, self.mask.ndim == 2)
        return value * _place(m, (_head_axis(SITES[self.site].axes),), SITES[self.site].axes).astype(value.dtype)


def zero_heads(cfg, heads: Iterable[tuple[int, int]], site: str = "attn.z", **kw) -> ScaleHeads:
    """Zero-ablate the `(layer, head)` pairs in `heads`."""
    mask = np.ones((cfg.n_layers, cfg.n_heads), np.float32)
    for layer, head in heads:
        mask[layer, head] = 0.0
    return ScaleHeads(mask, site, **kw)


class Replace(Intervention):
    """Replace the value by `source`: a cache `[n_layers, B, T, ...]` (indexed by layer), a site-shaped
    array `[B, T, ...]`, or anything broadcastable (a mean `[L, 1, T, ...]`, a scalar 0).

    A source whose sequence length differs from the pass (a prompt-length cache during a decode step) leaves
    that pass untouched; restrict with `steps="prompt"` to make that explicit.
    """

    site: str = eqx.field(static=True)
    source: Float[Array, "..."]
    where: Where

    def __init__(self, site: str, source, *, where: Where | None = None, **kw):
        self.site, self.where = site, _where(site, where, kw)
        self.source = jnp.asarray(source)

    def edit(self, value, ctx):
        axes = SITES[self.site].axes
        src = self.source
        if src.ndim == len(axes) + 1:
            src = _per_layer(src, ctx, True)
        if src.ndim == len(axes):
            for a, have, want in zip(axes, src.shape, value.shape):
                if have not in (1, want):
                    if a in ("T", "S"):
                        return None
                    raise InputError(f"{self.site}: source axis {a} has size {have}, the activation {want}")
        return src


def patch(site: str, cache, **kw) -> Replace:
    """Activation patching from a cache of `site` (e.g. the clean run's `acts[site]`)."""
    return Replace(site, cache, **kw)


def zero_ablation(site: str, **kw) -> Replace:
    return Replace(site, 0.0, **kw)


def _batch_axis(site: str, cache) -> int:
    return int(cache.ndim == len(SITES[site].axes) + 1)


def mean_ablation(site: str, cache, mask=None, *, over_positions: bool = False, **kw) -> Replace:
    """Replace by the mean of `cache` over the batch (and positions if `over_positions`), weighting real
    tokens only when `mask [B, T]` is given. `cache` is `[L, B, T, ...]` or `[B, T, ...]`."""
    cache = jnp.asarray(cache, jnp.float32)
    axes = SITES[site].axes
    lead = _batch_axis(site, cache)
    names = ("L",) * lead + axes
    w = jnp.ones((1,) * cache.ndim) if mask is None else _place(jnp.asarray(mask, jnp.float32), ("B", "T"), names)
    over = tuple(i for i, a in enumerate(names) if a == "B" or (over_positions and a == "T"))
    w = jnp.broadcast_to(w, cache.shape)
    mean = jnp.sum(cache * w, over, keepdims=True) / jnp.maximum(jnp.sum(w, over, keepdims=True), 1e-9)
    return Replace(site, mean, **kw)


def resample_ablation(site: str, cache, key: jax.Array | None = None, **kw) -> Replace:
    """Replace by the activation of another prompt of the batch: a random permutation of the batch axis of
    `cache` (with `key`), else each row takes the next row's (a roll by one)."""
    cache = jnp.asarray(cache)
    axis = _batch_axis(site, cache)
    n = cache.shape[axis]
    perm = jax.random.permutation(key, n) if key is not None else (jnp.arange(n) + 1) % n
    return Replace(site, jnp.take(cache, perm, axis=axis), **kw)


class Function(Intervention):
    """A user-supplied pure function `fn(value, ctx)`, or `fn(value, ctx, params)` when `params` (a pytree of
    arrays, differentiable and vmappable) is given. `fn` is static: reuse the same function object to avoid
    recompiling."""

    site: str = eqx.field(static=True)
    fn: Callable = eqx.field(static=True)
    params: Any
    where: Where

    def __init__(self, site: str, fn: Callable, params=None, *, where: Where | None = None, **kw):
        self.site, self.fn, self.params, self.where = site, fn, params, _where(site, where, kw)

    def edit(self, value, ctx):
        return self.fn(value, ctx) if self.params is None else self.fn(value, ctx, self.params)


# ----------------------------------------------------------------------------- batches of interventions


def stack(interventions: Sequence[Intervention]) -> Intervention:
    """A batch of same-kind interventions as one pytree with a leading sweep axis (for `jax.vmap`)."""
    if not interventions:
        raise InputError("stack() needs at least one intervention")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *interventions)


def unstack(stacked, i: int):
    """Item `i` of a stacked batch."""
    return jax.tree.map(lambda x: x[i], stacked)


def first_layers(stacked: Intervention | Where, n: int, n_layers: int) -> np.ndarray:
    """For each of the `n` items of a stacked intervention (or `Where`), the first layer it can change: layers
    below it need not be recomputed. Needs concrete (not traced) arrays."""
    w = stacked if isinstance(stacked, Where) else stacked.where
    site = None if isinstance(stacked, Where) else stacked.site
    if site is not None and not SITES[site].per_layer:
        return np.zeros(n, np.int64)
    out = np.zeros(n, np.int64)
    if w.layers is not None:
        out = np.asarray(w.layers).reshape(n, -1).min(1)
    if w.heads is not None and np.ndim(w.heads) == 3:  # [n, L, H]
        used = np.asarray(w.heads).reshape(n, n_layers, -1).any(-1)
        out = np.maximum(out, np.where(used.any(1), used.argmax(1), n_layers - 1))
    if isinstance(stacked, ScaleHeads) and np.ndim(stacked.mask) == 3:  # [n, L, H]: heads not scaled by 1
        changed = (np.asarray(stacked.mask) != 1).any(-1)
        out = np.maximum(out, np.where(changed.any(1), changed.argmax(1), n_layers - 1))
    return out
