"""Interventions as data: equinox pytrees applied inside `models.forward` at a named site.

Every intervention has a static `site` (a name from `models.sites.SITES`; a `models.Hook` names one layer), a
`where` (`Where`: which layers, positions, heads and decoding steps it touches; static, so it is compiled in)
and float arrays as leaves, so a tuple of them composes (applied in order), `jax.grad` differentiates with respect to their arrays as is, and
`jax.vmap` runs a stacked batch of them as one program (`stack`: the selections become a `StackedWhere` of
integer arrays, so differentiate a stacked batch with `eqx.filter_grad`).

    steer = AddVector("resid_pre", v, scale=4.0, layers=(6,))               # ActAdd at layer 6
    same = AddVector(Hook("resid_pre", 6), v, scale=4.0)                     # the same, by its hook
    last = AddVector("resid_pre", v, layers=(6,), positions=(-1,))            # each row's last real token
    ablate = directional_ablation(r)                                         # project r out everywhere
    heads = zero_heads(cfg, [(3, 1), (5, 0)])                                # [layers, heads] mask at attn.z
    logits, _ = models.forward(m, tokens, mask, interventions=(steer, *ablate, heads))
    models.generate(m, prompts, 20, interventions=(AddVector("resid_pre", v, 4.0, layers=(6,), steps="generated"),))

Selections are computed from the traced `SiteContext`, never from Python state: `layers` compares with
`ctx.layer` (inside the layer scan); `positions` counts each row's real tokens (0 = first, -1 = last: the
meaning of `Capture(positions=)` and the readouts), continuing through the position ids during generation;
`position_ids` matches the ids as given; `tokens` is a sequence-index mask for full passes; `steps` tells the
prompt pass from decode steps. When an intervention meets a model (`models.forward`, `models.generate`, the
sweeps) `validate` checks it against the config and the input: a layer, head or position outside the model
or the prompt, or a selection that matches nothing, is an InputError naming it and the valid range.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from models.checks import Extent, check_index, check_positions, concrete, show_values
from models.errors import InputError
from models.params import axis_sizes
from models.sites import SITES, Hook, check_site, names_layer
from models.transformer import SiteContext

__all__ = [
    "AddVector", "AlongDirection", "Function", "Intervention", "RESID_SITES", "Replace", "ScaleHeads", "StackedWhere",
    "Where", "at",
    "clamp_component", "directional_ablation", "first_layers", "mean_ablation", "patch", "project_out",
    "resample_ablation", "set_component", "stack", "unstack", "zero_ablation", "zero_heads",
]

RESID_SITES = ("resid_pre", "resid_mid", "resid_post")
STEPS = ("all", "prompt", "generated")


def _place(x: Array, names: tuple[str, ...], axes: tuple[str, ...]) -> Array:
    """Reshape `x` (axes `names`, in site order) so it broadcasts against a value with axes `axes`."""
    return jnp.reshape(x, [x.shape[names.index(a)] if a in names else 1 for a in axes])


def _head_axis(axes: tuple[str, ...]) -> str:
    for a in ("heads", "kv_heads"):
        if a in axes:
            return a
    raise InputError(f"site with axes {axes} has no head axis; heads= needs a per-head site such as attn.z")


def _static(x, name: str, kind: str):
    """A selection as a hashable tuple (nested for a 2-D mask): part of the compiled program, not a leaf."""
    if x is None:
        return None
    if isinstance(x, jax.core.Tracer):
        raise InputError(f"Where({name}=...) is static (compiled into the program) and cannot be traced; a batch of "
                         "selections to vmap over is a StackedWhere (interventions.stack)")
    a = np.asarray(x)
    if kind == "int":
        a = np.atleast_1d(a)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise InputError(f"Where({name}={x!r}) takes integers, got dtype {a.dtype}")
        ok = a.ndim == 1
    else:
        if a.size and a.dtype != bool and not np.isin(a, (0, 1)).all():
            raise InputError(f"Where({name}=...) is a boolean mask, got values other than 0/1")
        a, ok = a.astype(bool), a.ndim in (1, 2)
    if not ok:
        raise InputError(f"Where({name}=...) got shape {a.shape}; a batch of selections (one per sweep item) is a "
                         "StackedWhere (interventions.stack([Where(...), ...]))")
    return tuple(tuple(r) for r in a.tolist()) if a.ndim == 2 else tuple(a.tolist())


def _array(x, dtype):
    return None if x is None else jnp.asarray(x, dtype)


class _Selection(eqx.Module):
    """What `Where` and `StackedWhere` share: the gate and its validation against the model."""

    def gate(self, site: str, value: Array, ctx: SiteContext):
        """Boolean array broadcastable to `value` (True where to apply), `None` for everywhere, `False` for nowhere,
        within the selected layers (`Intervention.apply` tests `layers`, so the edit runs only at those)."""
        axes = SITES[site].axes
        conds = []
        if self.steps != "all":
            conds.append(ctx.step == 0 if self.steps == "prompt" else ctx.step > 0)
        tok = None
        real = ctx.attention_mask > 0
        if self.positions is not None:  # the p-th real token: counted in the pass, or by position id when decoding
            index = jnp.where(ctx.step == 0, jnp.cumsum(real, 1) - 1, ctx.positions)
            n = jnp.max(jnp.where(real, index, -1), 1, keepdims=True) + 1  # real tokens so far, [B, 1]
            p = _array(self.positions, jnp.int32)
            want = jnp.where(p < 0, n[..., None] + p, p)  # [B, 1, n]
            tok = jnp.any(index[..., None] == want, -1) & real
        if self.position_ids is not None:
            sel = jnp.any(ctx.positions[..., None] == _array(self.position_ids, jnp.int32), -1) & real
            tok = sel if tok is None else tok & sel
        if self.tokens is not None:
            tokens = _array(self.tokens, bool)
            if tokens.shape[-1] != value.shape[axes.index("seq")]:
                return False
            sel = jnp.broadcast_to(tokens, ctx.positions.shape)
            tok = sel if tok is None else tok & sel
        if tok is not None:
            conds.append(_place(tok, ("batch", "seq"), axes))
        if self.heads is not None:
            heads = _array(self.heads, bool)
            h = heads[ctx.layer] if heads.ndim == 2 else heads
            conds.append(_place(h, (_head_axis(axes),), axes))
        if not conds:
            return None
        g = conds[0]
        for c in conds[1:]:
            g = g & c
        return g

    def validate(self, site: str, ext: Extent, name: str = "Where: ") -> None:
        """Raise InputError if a selection is out of range for the model or selects nothing (concrete values;
        `ext.stacked`: the arrays have a leading sweep axis)."""
        cfg, lead = ext.cfg, int(ext.stacked)
        check_index(f"{name}layers", self.layers, cfg.n_layers, f"a model of {cfg.n_layers} layers")
        if self.heads is not None:
            axis = _head_axis(SITES[site].axes)
            n = cfg.n_heads if axis == "heads" else cfg.n_kv_heads
            shape = np.shape(self.heads)[lead:]
            want = ((n,), (cfg.n_layers, n))
            if shape not in want:
                raise InputError(f"{name}heads=... has shape {shape}; at {site} it is a mask [{n}] or "
                                 f"[{cfg.n_layers} layers, {n} heads]")
            _nonempty(f"{name}heads", self.heads, lead)
        if self.tokens is not None:
            shape = np.shape(self.tokens)[lead:]
            batch = None if ext.lengths is None else len(ext.lengths)
            if shape[-1] != ext.seq_len or (len(shape) == 2 and batch is not None and shape[0] != batch):
                raise InputError(f"{name}tokens=... has shape {shape}; it is a mask over this input's sequence "
                                 f"axis, [{ext.seq_len}] or [{batch}, {ext.seq_len}]")
            if self.steps == "generated":
                raise InputError(f"{name}tokens=..., steps='generated') selects nothing: tokens= masks the prompt pass "
                                 "only; select generated tokens with positions=")
            _nonempty(f"{name}tokens", self.tokens, lead)
        if self.position_ids is not None:
            top = ext.seq_len + ext.new_tokens if ext.lengths is None else int(np.max(ext.lengths)) + ext.new_tokens
            check_index(f"{name}position_ids", self.position_ids, top, f"position ids up to {top - 1} in this call")
        if self.positions is not None:
            _check_where_positions(f"{name}positions", self.positions, self.steps, ext)


def _nonempty(name: str, mask, lead: int) -> None:
    m = concrete(mask)
    if m is None:
        return
    m = np.asarray(m, bool).reshape((m.shape[0], -1) if lead else (1, -1))
    if not m.any(1).all():
        raise InputError(f"{name}=... selects nothing (the mask is all False{' for some item' if lead else ''})")


def _check_where_positions(name: str, positions, steps: str, ext: Extent) -> None:
    """Positions that exist in every row: on the prompt pass, and with `models.generate` at a decode step
    (where only the newest token, -1, or a position id reached by generation can be edited)."""
    p = concrete(positions)
    if p is None or p.size == 0:
        return
    lengths = np.full(1, ext.seq_len) if ext.lengths is None else ext.lengths
    lo, hi, new = int(np.min(lengths)), int(np.max(lengths)), ext.new_tokens
    if steps == "prompt" or new == 0:
        check_positions(name, p, ext.lengths, ext.seq_len)
        return
    last = lo + new - 2  # the last position id a decode step feeds, in the shortest row
    neg, pos = p[p < 0], p[p >= 0]
    if steps == "generated":
        bad = neg[neg != -1].tolist() + pos[(pos < hi) | (pos > last)].tolist()
        valid = f"-1 (each newest token) or {hi}..{last} (tokens generated in every row)"
    else:
        bad = neg[neg < -lo].tolist() + pos[pos > last].tolist()
        valid = f"{-lo}..{last} (the prompt's shortest row has {lo} tokens, then {new} are generated)"
    if bad:
        raise InputError(f"{name}={show_values(p)} selects nothing for position {bad[0]} with steps={steps!r} "
                         f"(valid: {valid})")


class Where(_Selection):
    """Where an intervention applies; `None` means everywhere. Selections are static (hashable tuples, part of
    the compiled program), so `jax.grad` applies to an intervention as is; a batch of selections to vmap over
    is a `StackedWhere` (`stack`). Checked against the model when it meets one (InputError naming the bound).

    layers:       layer indices `[n]` (compared with the traced `ctx.layer`; not for `embed`/`final_norm`).
    positions:    the `p`-th real token of each row, `[n]`: 0 = first real token, -1 = last (the same meaning as
                  `Capture(positions=)` and the readouts). During generation a decode step's token counts on
                  from the prompt (its position id), so `-1` is each newest token.
    position_ids: `[n]` position ids as given to the model (`cumsum(mask) - 1` unless `positions=` was passed).
    tokens:       `[T]` or `[B, T]` mask over the sequence axis of a full pass; passes of another length
                  (decode steps) are left untouched.
    heads:        `[H]` or `[L, H]` (indexed by layer) mask over the head axis of per-head sites.
    steps:        "all", "prompt" (`ctx.step == 0`) or "generated" (decode steps of `models.generate`).
    """

    layers: tuple[int, ...] | None = eqx.field(default=None, static=True, converter=lambda x: _static(x, "layers", "int"))
    positions: tuple[int, ...] | None = eqx.field(default=None, static=True,
                                                  converter=lambda x: _static(x, "positions", "int"))
    position_ids: tuple[int, ...] | None = eqx.field(default=None, static=True,
                                                     converter=lambda x: _static(x, "position_ids", "int"))
    tokens: tuple | None = eqx.field(default=None, static=True, converter=lambda x: _static(x, "tokens", "bool"))
    heads: tuple | None = eqx.field(default=None, static=True, converter=lambda x: _static(x, "heads", "bool"))
    steps: str = eqx.field(default="all", static=True)

    def __check_init__(self):
        if self.steps not in STEPS:
            raise InputError(f"steps must be one of {STEPS}, got {self.steps!r}")


class StackedWhere(_Selection):
    """A batch of `Where` selections with a leading sweep axis `[N, ...]` on every field, as arrays (leaves), for
    `jax.vmap` and the sweeps; `stack([Where(...), ...])` builds one. Integer leaves: differentiate a stacked
    intervention with `eqx.filter_grad`."""

    layers: Int[Array, "N n"] | None = eqx.field(default=None, converter=lambda x: _array(x, jnp.int32))
    positions: Int[Array, "N n"] | None = eqx.field(default=None, converter=lambda x: _array(x, jnp.int32))
    position_ids: Int[Array, "N n"] | None = eqx.field(default=None, converter=lambda x: _array(x, jnp.int32))
    tokens: Bool[Array, "N *B T"] | None = eqx.field(default=None, converter=lambda x: _array(x, bool))
    heads: Bool[Array, "N *L H"] | None = eqx.field(default=None, converter=lambda x: _array(x, bool))
    steps: str = eqx.field(default="all", static=True)

    def __check_init__(self):
        if self.steps not in STEPS:
            raise InputError(f"steps must be one of {STEPS}, got {self.steps!r}")

    @classmethod
    def of(cls, where: Where) -> "StackedWhere":
        """One item (no sweep axis yet) holding `where`'s selections as arrays."""
        return cls(where.layers, where.positions, where.position_ids, where.tokens, where.heads, where.steps)


def _where(site: "str | Hook", where: _Selection | None, kwargs: dict) -> tuple[str, _Selection]:
    """`(site name, selection)` of an intervention's arguments: a `Hook` site selects its layer; a run key
    (`"L3.attn.z"`) or a TransformerLens hook name (`"blocks.3.attn.hook_z"`) is read as `Hook.parse` reads it."""
    if isinstance(site, str) and names_layer(site):
        site = Hook.parse(site)
    if isinstance(site, Hook):
        if site.layer is not None:
            if where is not None or "layers" in kwargs:
                raise InputError(f"{site.key}: the Hook names the layer; pass layers= with a site name instead")
            kwargs = dict(kwargs, layers=(site.layer,))
        site = site.site
    check_site(site)
    if where is not None and kwargs:
        raise InputError("pass either where= or its fields (layers=, positions=, ...), not both")
    w = where if where is not None else Where(**kwargs)
    if w.layers is not None and not SITES[site].per_layer:
        raise InputError(f"site {site!r} is not a layer site; layers= does not apply")
    return site, w


def at(site: "str | Hook", layer: int | None = None) -> Where:
    """The `Where` of one hook: `layer` of a layer site, every layer when it is None; a model site: everywhere.
    `at(Hook("resid_post", 6))` is `at("resid_post", 6)` is `Where(layers=(6,))`."""
    return _where(site, None, {} if layer is None else dict(layers=(layer,)))[1]


def _per_layer(x: Array, ctx: SiteContext, per_layer: bool) -> Array:
    if not per_layer:
        return x
    if ctx.layer is None:
        raise InputError("a per-layer value ([n_layers, ...]) needs a layer site")
    return x[ctx.layer]


def _check_width(iv, field: str, x: Array, value: Array) -> None:
    """At trace time (shapes are static): `x`'s last axis is 1 or the site value's, else an InputError naming the
    site and both widths (what `validate` says before tracing, for callers that skip it)."""
    if x.ndim and x.shape[-1] not in (1, value.shape[-1]):
        raise InputError(f"{type(iv).__name__}({iv.site!r}): {field} has width {x.shape[-1]}, but site {iv.site!r} "
                         f"has width {value.shape[-1]}")


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


class Intervention(eqx.Module):
    """Base class of every intervention (what `models.forward` takes as a `models.transformer.SiteEdit`):
    subclasses hold `site`, `where` and define `edit(value, ctx)`; `apply` restricts the edit to `where`
    (exactly: untouched elements are the input values). With `where.layers` set, the edit is evaluated only at
    those layers (`lax.cond` inside the layer scan), so an expensive edit (an SAE splice) costs one layer. Under
    `jax.vmap` over items with different layers (a `StackedWhere`) the predicate is batched and the cond
    becomes a select that evaluates the edit at every layer; `interp.sweeps.sweep` avoids that by running
    the items of one layer selection together with their layers unbatched (`interp.sweeps.plan_calls`)."""

    def edit(self, value: Array, ctx: SiteContext) -> Array | None:
        raise NotImplementedError

    def apply(self, value: Array, ctx: SiteContext) -> Array:
        w = self.where
        if w.layers is None or ctx.layer is None:
            return self._gated(value, ctx)
        hit = jnp.any(ctx.layer == _array(w.layers, jnp.int32))
        return jax.lax.cond(hit, lambda v: self._gated(v, ctx), lambda v: v, value)

    def _gated(self, value: Array, ctx: SiteContext) -> Array:
        g = self.where.gate(self.site, value, ctx)
        if g is False:
            return value
        new = self.edit(value, ctx)
        if new is None:
            return value
        new = jnp.broadcast_to(new.astype(value.dtype), value.shape)
        return new if g is None else jnp.where(g, new, value)

    def validate(self, ext: Extent) -> None:
        """InputError if the selection (`Where.validate`) or an array indexed by layer does not fit the model;
        `models.forward`, `models.generate` and the sweeps call this before tracing."""
        name = f"{type(self).__name__}({self.site!r}): "
        self.where.validate(self.site, ext, name)
        lead = int(ext.stacked)
        for field, x, by_layer in self._layer_indexed(lead):
            shape = np.shape(x)[lead:]
            if by_layer and shape[0] != ext.cfg.n_layers:
                raise InputError(f"{name}{field} has shape {shape}: its leading axis is indexed by layer and must be "
                                 f"the model's {ext.cfg.n_layers} layers")
        axis = SITES[self.site].axes[-1]
        width = axis_sizes(ext.cfg).get(axis)
        for field, x, by_layer in self._widthed(lead):
            shape = np.shape(x)[lead + int(by_layer):]
            if width is not None and shape and shape[-1] not in (1, width):
                raise InputError(f"{name}{field} has width {shape[-1]} (shape {shape}), but site {self.site!r} has "
                                 f"width {width} (its last axis, {axis!r}, of this model)")

    def _widthed(self, lead: int) -> tuple[tuple[str, Array, bool], ...]:
        """(field name, array whose last axis meets the site's last axis, whether it has a leading layer axis)."""
        return ()

    def _layer_indexed(self, lead: int) -> tuple[tuple[str, Array, bool], ...]:
        """(field name, array, whether `edit` indexes its leading axis by `ctx.layer`)."""
        return ()


class AddVector(Intervention):
    """`value + scale * vector` (ActAdd / steering). `vector` has the site's trailing shape (`[D]` for residual
    sites) or any shape broadcastable to the value; with `per_layer=True` it has a leading `[n_layers]` axis.
    `scale` is a scalar or `[n_layers]` (a per-layer scale)."""

    site: str = eqx.field(static=True)
    vector: Float[Array, "..."]
    scale: Float[Array, "*L"]
    where: Where
    per_layer: bool = eqx.field(static=True)

    def __init__(self, site: "str | Hook", vector, scale=1.0, *, per_layer: bool = False, where: Where | None = None, **kw):
        (self.site, self.where), self.per_layer = _where(site, where, kw), per_layer
        self.vector, self.scale = _f32(vector), _f32(scale)

    def edit(self, value, ctx):
        scale = _per_layer(self.scale, ctx, self.scale.ndim == 1)
        vector = _per_layer(self.vector, ctx, self.per_layer)
        _check_width(self, "vector", vector, value)
        return value + scale * vector

    def _layer_indexed(self, lead):
        return ("vector", self.vector, self.per_layer), ("scale", self.scale, self.scale.ndim - lead == 1)

    def _widthed(self, lead):
        return (("vector", self.vector, self.per_layer),)


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

    def __init__(self, site: "str | Hook", direction, lo=0.0, hi=0.0, *, per_layer: bool = False, where: Where | None = None, **kw):
        (self.site, self.where), self.per_layer = _where(site, where, kw), per_layer
        self.direction, self.lo, self.hi = _f32(direction), _f32(lo), _f32(hi)

    def edit(self, value, ctx):
        d = _per_layer(self.direction, ctx, self.per_layer)
        _check_width(self, "direction", d, value)
        r = d / jnp.maximum(jnp.linalg.norm(d), 1e-30)  # a zero direction edits nothing
        x = value.astype(jnp.float32)
        p = x @ r
        lo = _per_layer(self.lo, ctx, self.lo.ndim == 1)
        hi = _per_layer(self.hi, ctx, self.hi.ndim == 1)
        return x + (jnp.clip(p, lo, hi) - p)[..., None] * r

    def _layer_indexed(self, lead):
        return (("direction", self.direction, self.per_layer), ("lo", self.lo, self.lo.ndim - lead == 1),
                ("hi", self.hi, self.hi.ndim - lead == 1))

    def _widthed(self, lead):
        return (("direction", self.direction, self.per_layer),)


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
        (self.site, self.where), self.mask = _where(site, where, kw), _f32(mask)
        _head_axis(SITES[self.site].axes)

    def edit(self, value, ctx):
        m = _per_layer(self.mask, ctx, self.mask.ndim == 2)
        return value * _place(m, (_head_axis(SITES[self.site].axes),), SITES[self.site].axes).astype(value.dtype)

    def validate(self, ext):
        super().validate(ext)
        n = ext.cfg.n_heads if _head_axis(SITES[self.site].axes) == "heads" else ext.cfg.n_kv_heads
        shape = np.shape(self.mask)[int(ext.stacked):]
        if shape[-1:] != (n,):
            raise InputError(f"ScaleHeads({self.site!r}): mask has shape {shape}; its last axis must be the {n} "
                             f"heads of {self.site}")

    def _layer_indexed(self, lead):
        return (("mask", self.mask, self.mask.ndim - lead == 2),)


def zero_heads(cfg, heads: Iterable[tuple[int, int]], site: str = "attn.z", **kw) -> ScaleHeads:
    """Zero-ablate the `(layer, head)` pairs in `heads` (InputError for a pair outside the model)."""
    n = cfg.n_heads if _head_axis(check_site(site).axes) == "heads" else cfg.n_kv_heads
    mask = np.ones((cfg.n_layers, n), np.float32)
    for layer, head in heads:
        check_index("zero_heads: layer", np.asarray([layer]), cfg.n_layers, f"a model of {cfg.n_layers} layers")
        check_index(f"zero_heads: head (of layer {layer})", np.asarray([head]), n, f"the {n} heads of {site}")
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

    def __init__(self, site: "str | Hook", source, *, where: Where | None = None, **kw):
        self.site, self.where = _where(site, where, kw)
        self.source = jnp.asarray(source)

    def edit(self, value, ctx):
        axes = SITES[self.site].axes
        src = self.source
        if src.ndim == len(axes) + 1:
            src = _per_layer(src, ctx, True)
        if src.ndim == len(axes):
            for a, have, want in zip(axes, src.shape, value.shape):
                if have not in (1, want):
                    if a in ("seq", "kv_seq"):
                        return None
                    raise InputError(f"{self.site}: source axis {a} has size {have}, the activation {want}")
        return src

    def validate(self, ext):
        super().validate(ext)
        axes = SITES[self.site].axes
        shape = np.shape(self.source)[int(ext.stacked):]
        if len(shape) in (len(axes), len(axes) + 1) and "seq" in axes:
            t = shape[len(shape) - len(axes) + axes.index("seq")]
            if t not in (1, ext.seq_len):
                raise InputError(f"Replace({self.site!r}): source has {t} positions and this input {ext.seq_len}: it "
                                 "would replace nothing (a source of another length applies only to decode steps)")

    def _layer_indexed(self, lead):
        return (("source", self.source, self.source.ndim - lead == len(SITES[self.site].axes) + 1),)


def patch(site: str, cache, **kw) -> Replace:
    """Activation patching from a cache of `site` (e.g. the clean run's `acts[site]`)."""
    return Replace(site, cache, **kw)


def zero_ablation(site: str, **kw) -> Replace:
    """Replace `site` by zeros (the `Where` fields in `kw` narrow it: `layers=`, `positions=`, `heads=`, ...)."""
    return Replace(site, 0.0, **kw)


def _batch_axis(site: str, cache) -> int:
    return int(cache.ndim == len(SITES[site].axes) + 1)


def mean_ablation(site: str, cache, mask=None, *, over_positions: bool = False, **kw) -> Replace:
    """Replace by the mean of `cache` over the batch (and positions if `over_positions`), weighting real
    tokens only when `mask [B, T]` is given. `cache` is `[L, B, T, ...]` or `[B, T, ...]`."""
    cache = jnp.asarray(cache, jnp.float32)
    axes = SITES[site].axes
    lead = _batch_axis(site, cache)
    names = ("layers",) * lead + axes
    w = jnp.ones((1,) * cache.ndim) if mask is None else _place(jnp.asarray(mask, jnp.float32), ("batch", "seq"), names)
    over = tuple(i for i, a in enumerate(names) if a == "batch" or (over_positions and a == "seq"))
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

    def __init__(self, site: "str | Hook", fn: Callable, params=None, *, where: Where | None = None, **kw):
        (self.site, self.where), self.fn, self.params = _where(site, where, kw), fn, params

    def edit(self, value, ctx):
        return self.fn(value, ctx) if self.params is None else self.fn(value, ctx, self.params)


# ----------------------------------------------------------------------------- batches of interventions


def _as_item(x):
    """An intervention (or a `Where`) with its static selection turned into arrays, ready to stack."""
    if isinstance(x, Where):
        return StackedWhere.of(x)
    if isinstance(getattr(x, "where", None), Where):
        return eqx.tree_at(lambda t: t.where, x, StackedWhere.of(x.where))
    return x


def stack(interventions: Sequence[Intervention | Where]) -> Intervention | StackedWhere:
    """A batch of same-kind interventions (or `Where`s) as one pytree with a leading sweep axis on every array
    (for `jax.vmap` and `interp.sweeps.sweep`); their selections become a `StackedWhere`."""
    if not interventions:
        raise InputError("stack() needs at least one intervention")
    items = [_as_item(x) for x in interventions]
    try:
        return jax.tree.map(lambda *xs: jnp.stack(xs), *items)
    except ValueError as e:
        raise InputError(f"stack() needs items of one kind with the same fields set and the same shapes: {e}") from None


def unstack(stacked, i: int):
    """Item `i` of a stacked batch."""
    return jax.tree.map(lambda x: x[i], stacked)


def first_layers(stacked: Intervention | StackedWhere, n: int, n_layers: int) -> np.ndarray:
    """For each of the `n` items of a stacked intervention (or `StackedWhere`), the first layer it can change:
    layers below it need not be recomputed. Needs concrete (not traced) arrays."""
    w = stacked if isinstance(stacked, _Selection) else stacked.where
    site = None if isinstance(stacked, _Selection) else stacked.site
    if site is not None and not SITES[site].per_layer:
        return np.zeros(n, np.int64)
    lead = isinstance(w, StackedWhere)  # a plain Where is one selection shared by every item
    out = np.zeros(n, np.int64)
    if w.layers is not None:
        out = np.broadcast_to(np.asarray(w.layers).reshape(n if lead else 1, -1).min(1), (n,))
    if w.heads is not None and np.ndim(w.heads) == 2 + lead:  # [n, L, H] or a shared [L, H]
        used = np.asarray(w.heads).reshape(n if lead else 1, n_layers, -1).any(-1)
        out = np.maximum(out, np.where(used.any(1), used.argmax(1), n_layers - 1))
    if isinstance(stacked, ScaleHeads) and np.ndim(stacked.mask) == 3:  # [n, L, H]: heads not scaled by 1
        changed = (np.asarray(stacked.mask) != 1).any(-1)
        out = np.maximum(out, np.where(changed.any(1), changed.argmax(1), n_layers - 1))
    return out


# ----------------------------------------------------------------------------- per-example steering


class AddVectorPerExample(Intervention):
    """`value + scale[b, layer] * vector`: a steering scale per example and per layer, `scale [B, n_layers]`
    (e.g. a controller's output for each prompt), so one batch steers every row by its own amount. `vector` has
    the site's trailing shape (`[D]` at residual sites), or a leading batch axis as well (`[B, D]`: a vector
    per row). `models.generate` keeps the rows in order, so the same scales apply on the prompt pass and at
    every decode step; `where` narrows it (`layers=(L - 1,), positions=(-1,)`: the last layer, each row's
    newest token)."""

    site: str = eqx.field(static=True)
    vector: Float[Array, "*B ..."]
    scale: Float[Array, "B L"]
    where: Where

    def __init__(self, site: "str | Hook", vector, scale, *, where: Where | None = None, **kw):
        self.site, self.where = _where(site, where, kw)
        if not SITES[self.site].per_layer:
            raise InputError(f"AddVectorPerExample: site {self.site!r} is not a layer site; scale is [batch, n_layers]")
        self.vector, self.scale = _f32(vector), _f32(scale)
        if self.scale.ndim != 2:
            raise InputError(f"AddVectorPerExample: scale has shape {self.scale.shape}; it is [batch, n_layers]")

    def _per_row(self) -> bool:
        return self.vector.ndim == len(SITES[self.site].axes) - 1

    def edit(self, value, ctx):
        B = value.shape[0]
        if self.scale.shape[0] != B or (self._per_row() and self.vector.shape[0] != B):
            raise InputError(f"AddVectorPerExample({self.site!r}): scale {self.scale.shape} / vector "
                             f"{self.vector.shape} have a batch axis that is not this input's {B} rows")
        s = self.scale[:, ctx.layer].reshape((B,) + (1,) * (value.ndim - 1))
        return value + s * (self.vector[:, None] if self._per_row() else self.vector)

    def _widthed(self, lead):
        return (("vector", self.vector, False),)

    def validate(self, ext: Extent) -> None:
        super().validate(ext)
        lead = int(ext.stacked)
        shape, vec = np.shape(self.scale)[lead:], np.shape(self.vector)[lead:]
        batch = None if ext.lengths is None else len(ext.lengths)
        rows = "batch" if batch is None else f"{batch} rows"
        if shape[1] != ext.cfg.n_layers or (batch is not None and shape[0] != batch):
            raise InputError(f"AddVectorPerExample({self.site!r}): scale has shape {shape}; it is "
                             f"[{rows}, the model's {ext.cfg.n_layers} layers]")
        if len(vec) == len(SITES[self.site].axes) - 1 and batch is not None and vec[0] != batch:
            raise InputError(f"AddVectorPerExample({self.site!r}): vector has shape {vec}; a vector per row has "
                             f"a leading axis of {rows}")
