"""One pure-functional decoder-only transformer, switched by `Config`, returning logits and activations.

Parameters are a plain pytree (see `models.params`); layers are stacked on a leading axis and run with
`jax.lax.scan` (or an unrolled Python loop: same numbers). Every activation passes through `_Sites.visit`,
which applies the interventions registered for that site and keeps it if it was asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from models.checks import check_call, real_index
from models.config import Config
from models.errors import InputError
from models.sharding import constrain
from models.sites import SITES, Hook, check_site, names_layer

Params = dict[str, Any]
NEG_INF = -1e30  # finite, so rows with no valid key give a uniform (then zeroed) pattern, never NaN
_Z_FOR_HEAD_OUT = "attn.z#for-head_out"  # internal record: z kept to derive a captured attn.head_out


class SiteContext(NamedTuple):
    """What an intervention may read besides the activation: the layer, where each token sits, and the values
    of the sites already visited in this layer (`seen`, after their interventions: a transcoder replacing
    `mlp_out` reads `seen["ln2.normalized"]`)."""

    layer: Int[Array, ""] | None  # None at model sites (embed, final_norm)
    positions: Int[Array, "B T"]  # position ids of the current tokens
    attention_mask: Int[Array, "B T"]  # 1 on real tokens of the current input
    step: Int[Array, ""]  # 0 on the prompt pass, then 1, 2, ... for each generated token
    seen: Mapping[str, Array] = {}  # site -> value, for the sites visited before this one in the same layer


@runtime_checkable
class SiteEdit(Protocol):
    """What the forward calls at a site: a `site` name and `apply(value, ctx) -> value`. Interventions are
    `interp.interventions.Intervention`s (equinox pytrees implementing this); the forward needs no more."""

    site: str

    def apply(self, value: Array, ctx: SiteContext) -> Array: ...


@dataclass(frozen=True)
class Capture:
    """Keep `site`, optionally only some `layers` and `positions`: the `p`-th real token of each row (0 = first
    real token, -1 = last, for left- or right-padded batches; see `models.checks`). `seq_indices` selects
    sequence-axis indices instead (negative from the end of the axis). Out-of-range values raise InputError."""

    site: str
    layers: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None
    seq_indices: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.positions is not None and self.seq_indices is not None:
            raise InputError(f"Capture({self.site!r}): pass positions= or seq_indices=, not both")


class KVCache(NamedTuple):
    """Keys/values of every layer for `S` slots, with each slot's position id and validity."""

    k: Float[Array, "L B S K d"]
    v: Float[Array, "L B S K d"]
    positions: Int[Array, "B S"]
    mask: Int[Array, "B S"]
    index: Int[Array, ""]  # next slot to write


def as_capture(c: "Capture | Hook | str") -> Capture:
    """A capture spec as a `Capture`: a site name (every layer), a run key (`"L3.attn.z"`) or TransformerLens hook
    name (`"blocks.3.attn.hook_z"`: that layer, also as a `Capture`'s site), a `Hook` (that layer), or a `Capture`."""
    if isinstance(c, str) and c not in SITES and names_layer(c):
        c = Hook.parse(c)
    if isinstance(c, Hook):
        c = Capture(c.site, layers=None if c.layer is None else (c.layer,))
    c = c if isinstance(c, Capture) else Capture(c)
    if isinstance(c.site, str) and c.site not in SITES and names_layer(c.site):
        hook = Hook.parse(c.site)
        if c.layers is not None and hook.layer is not None:
            raise InputError(f"Capture({c.site!r}, layers={c.layers}): the hook name already names layer {hook.layer}; "
                             f"pass layers= with a site name ({hook.site!r}) instead")
        c = Capture(hook.site, c.layers if hook.layer is None else (hook.layer,), c.positions, c.seq_indices)
    check_site(c.site)
    return c


class _Sites:
    """Applies interventions and records captures at each site, inside or outside the layer scan."""

    def __init__(self, capture: Sequence[Capture], interventions: Sequence[SiteEdit], ctx: SiteContext,
                 frozen: bool = False):
        self.capture = {c.site: c for c in capture}
        self.interventions = tuple(interventions)
        for iv in self.interventions:
            check_site(iv.site)
        self.ctx = ctx
        self.frozen = frozen  # see `forward(frozen=)`
        self.record: dict[str, Array] = {}
        self.seen: dict[str, Array] = {}

    def needs(self, name: str) -> bool:
        """Whether a site's value must be materialised inside the layer (captured or intervened on)."""
        if name == "attn.head_out" and self.head_out_from_z:
            return False
        return name in self.capture or any(iv.site == name for iv in self.interventions)

    @property
    def head_out_from_z(self) -> bool:
        """`attn.head_out` only captured: derive it after the scan from `attn.z` (much cheaper than stacking it)."""
        return "attn.head_out" in self.capture and not any(iv.site == "attn.head_out" for iv in self.interventions)

    def visit(self, name: str, value: Array, layer=None) -> Array:
        value = constrain(value, SITES[name].axes)
        ctx = self.ctx._replace(layer=layer, seen=dict(self.seen))
        for iv in self.interventions:
            if iv.site == name:
                value = iv.apply(value, ctx)
        self.seen[name] = value
        if name in self.capture:
            self.record[name] = self._select(name, value, self.capture[name])
        if name == "attn.z" and self.head_out_from_z:
            self.record[_Z_FOR_HEAD_OUT] = self._select(name, value, self.capture["attn.head_out"])
        return value

    def _select(self, name: str, value: Array, c: Capture) -> Array:
        axis = 2 if name in ("attn.scores", "attn.pattern") else 1
        if c.seq_indices is not None:
            return jnp.take(value, jnp.asarray(c.seq_indices) % value.shape[axis], axis=axis)
        if c.positions is None:
            return value
        idx = real_index(self.ctx.attention_mask, c.positions)  # [B, P]; T (-> NaN) where a row lacks it
        idx = idx.reshape(idx.shape[:1] + (1,) * (axis - 1) + idx.shape[1:] + (1,) * (value.ndim - axis - 1))
        return jnp.take_along_axis(value, idx, axis=axis, mode="fill", fill_value=jnp.nan)


# ----------------------------------------------------------------------------- primitives


def norm(x: Float[Array, "... D"], p: Params, cfg: Config, frozen: bool = False) -> Float[Array, "... D"]:
    """RMSNorm or LayerNorm in float32, cast back to the input dtype. `frozen`: no gradient through the
    scale 1/rms (the norm is then linear in `x`; values unchanged)."""
    h = x.astype(jnp.float32)
    if cfg.norm == "layer":
        h = h - h.mean(-1, keepdims=True)
    scale = jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + cfg.norm_eps)
    h = h * (jax.lax.stop_gradient(scale) if frozen else scale)
    h = h * p["w"].astype(jnp.float32)
    if "b" in p:
        h = h + p["b"].astype(jnp.float32)
    return h.astype(x.dtype)


def activation(x: Array, cfg: Config) -> Array:
    """The MLP nonlinearity `cfg.act` (`silu`, exact `gelu`, `gelu_tanh`, `relu`) applied to `x`."""
    return {
        "silu": jax.nn.silu,
        "gelu": lambda v: jax.nn.gelu(v, approximate=False),
        "gelu_tanh": lambda v: jax.nn.gelu(v, approximate=True),
        "relu": jax.nn.relu,
    }[cfg.act](x)


def rope_inv_freq(cfg: Config, local: bool, long: bool = False) -> Float[Array, " half"]:
    """Inverse frequencies of RoPE for global or local layers (scaling applies to global layers only); `long`
    picks longrope's long-context factors."""
    theta = cfg.rope_local_theta if (local and cfg.rope_local_theta is not None) else cfg.rope_theta
    inv = 1.0 / (theta ** (jnp.arange(0, cfg.rope_dim, 2, dtype=jnp.float32) / cfg.rope_dim))
    s = cfg.rope_scaling
    if s is None or (local and cfg.rope_local_theta is not None):
        return inv
    if s.kind == "linear":
        return inv / s.factor
    if s.kind == "longrope":
        return inv / jnp.asarray(s.long_factor if long else s.short_factor, jnp.float32)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: Float[Array, "B T N d"], positions: Int[Array, "B T"], inv_freq,
               scale: float = 1.0) -> Float[Array, "B T N d"]:
    """Rotate halves (Hugging Face layout) by angle position * inv_freq, in float32, cos and sin times `scale`
    (longrope's attention factor). With fewer frequencies than `d / 2` (partial rotary, GPT-NeoX), only the first
    `2 * len(inv_freq)` dimensions turn; the rest pass."""
    rot = 2 * inv_freq.shape[-1]
    if rot < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rot], positions, inv_freq, scale), x[..., rot:]], -1)
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [B T d/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[:, :, None, :] * scale
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[:, :, None, :] * scale
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], -1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def softcap(x: Array, cap: float | None) -> Array:
    """Gemma's soft-capping `tanh(x / cap) * cap` (identity when `cap` is None)."""
    return x if cap is None else jnp.tanh(x / cap) * cap


# ----------------------------------------------------------------------------- one layer


class LayerInputs(NamedTuple):
    """Per-layer values scanned over alongside the stacked parameters."""

    index: Int[Array, ""]
    is_local: Array  # bool scalar
    cache_k: Array | None
    cache_v: Array | None


@jax.named_scope("attention")
def attention(p: Params, x: Float[Array, "B T D"], li: LayerInputs, kv: dict, sites: _Sites, cfg: Config
              ) -> tuple[Float[Array, "B T D"], tuple[Float[Array, "B S K d"], Float[Array, "B S K d"]]]:
    """Multi-head (grouped-query) attention. `kv` holds key positions and validity (`[B, S]`, and the cache
    slot index); returns the output and this layer's keys and values (the cache's S slots when decoding)."""
    B, T, _ = x.shape
    layer = li.index
    q = jnp.einsum("btd,dhe->bthe", x, p["W_Q"])
    k = jnp.einsum("btd,dhe->bthe", x, p["W_K"])
    v = jnp.einsum("btd,dhe->bthe", x, p["W_V"])
    if cfg.qkv_bias:
        q, k, v = q + p["b_Q"], k + p["b_K"], v + p["b_V"]
    if cfg.qk_norm_full:  # one RMSNorm over every head's query (key) at once (OLMo 2)
        q = norm(q.reshape(B, T, -1), {"w": p["q_norm_full"]["w"].reshape(-1)}, cfg).reshape(q.shape)
        k = norm(k.reshape(B, T, -1), {"w": p["k_norm_full"]["w"].reshape(-1)}, cfg).reshape(k.shape)
    elif cfg.qk_norm:
        q, k = norm(q, p["q_norm"], cfg), norm(k, p["k_norm"], cfg)
    q = sites.visit("attn.q", q, layer)
    k = sites.visit("attn.k", k, layer)
    v = sites.visit("attn.v", v, layer)
    if cfg.positional == "rope":
        inv = jnp.where(li.is_local, rope_inv_freq(cfg, True), rope_inv_freq(cfg, False))
        scale = 1.0
        if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "longrope":  # per call, as transformers decides
            s = cfg.rope_scaling
            beyond = jnp.max(sites.ctx.positions) + 1 > s.original_max_position_embeddings
            inv, scale = jnp.where(beyond, rope_inv_freq(cfg, False, long=True), inv), s.attention_factor
        q = apply_rope(q, sites.ctx.positions, inv, scale)
        k = apply_rope(k, sites.ctx.positions, inv, scale)

    key_pos, key_valid = kv["positions"], kv["mask"]
    if li.cache_k is not None:  # write this step's keys/values into the cache slots
        k = jax.lax.dynamic_update_slice_in_dim(li.cache_k, k.astype(li.cache_k.dtype), kv["index"], axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(li.cache_v, v.astype(li.cache_v.dtype), kv["index"], axis=1)
    new_kv = (k, v)

    G = cfg.n_heads // cfg.n_kv_heads
    qg = q.reshape(B, T, cfg.n_kv_heads, G, cfg.d_head)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(B, cfg.n_heads, T, k.shape[1]) * cfg.query_scale
    scores = softcap(scores, cfg.attn_softcap)
    scores = sites.visit("attn.scores", scores, layer)

    qpos = sites.ctx.positions[:, None, :, None]
    kpos = key_pos[:, None, None, :]
    allowed = (kpos <= qpos) & (key_valid[:, None, None, :] > 0)
    if cfg.sliding_window is not None:
        window = jnp.where(li.is_local, cfg.sliding_window, jnp.iinfo(jnp.int32).max)
        allowed &= (qpos - kpos) < window
    pattern = jax.nn.softmax(jnp.where(allowed, scores, NEG_INF), axis=-1)
    pattern = pattern * (allowed & (sites.ctx.attention_mask[:, None, :, None] > 0))
    if sites.frozen:
        pattern = jax.lax.stop_gradient(pattern)
    pattern = sites.visit("attn.pattern", pattern, layer)

    vg = v.astype(pattern.dtype)
    z = jnp.einsum("bkgts,bskd->btkgd", pattern.reshape(B, cfg.n_kv_heads, G, T, -1), vg)
    z = z.reshape(B, T, cfg.n_heads, cfg.d_head).astype(x.dtype)
    z = sites.visit("attn.z", z, layer)
    if sites.needs("attn.head_out"):
        head_out = sites.visit("attn.head_out", jnp.einsum("bthe,hed->bthd", z, p["W_O"]), layer)
        out = head_out.sum(2)
    else:
        out = jnp.einsum("bthe,hed->btd", z, p["W_O"])
    if cfg.o_bias:
        out = out + p["b_O"]
    return out, new_kv


@jax.named_scope("mlp")
def mlp(p: Params, x: Float[Array, "B T D"], layer, sites: _Sites, cfg: Config) -> Float[Array, "B T D"]:
    """The MLP (gated when `cfg.gated_mlp`: act(x W_gate) * (x W_in)), its hidden `[B, T, F]` visited as sites."""
    pre = jnp.einsum("btd,df->btf", x, p["W_gate"] if cfg.gated_mlp else p["W_in"])
    if cfg.mlp_bias:
        pre = pre + (p["b_gate"] if cfg.gated_mlp else p["b_in"])
    pre = sites.visit("mlp.pre", pre, layer)
    post = activation(pre, cfg)
    if cfg.gated_mlp:
        up = jnp.einsum("btd,df->btf", x, p["W_in"])
        post = post * (up + p["b_in"] if cfg.mlp_bias else up)
    post = sites.visit("mlp.post", post, layer)
    out = jnp.einsum("btf,fd->btd", post, p["W_out"])
    return out + p["b_out"] if cfg.mlp_bias else out


@jax.named_scope("moe")
def moe(p: Params, x: Float[Array, "B T D"], layer, sites: _Sites, cfg: Config) -> Float[Array, "B T D"]:
    """A mixture of gated experts (Qwen3-MoE): the router's softmax picks `n_experts_used` experts per token
    (renormalised when `norm_topk_prob`), the output is their weighted sum. Every expert is computed for every
    token and the unchosen ones weigh zero: one compiled program whatever the routing, so forcing a routing or
    ablating an expert (interventions on `mlp.expert_weights`) changes data, not the program."""
    logits = jnp.einsum("btd,de->bte", x, p["W_router"], preferred_element_type=jnp.float32)
    logits = sites.visit("mlp.router_logits", logits, layer)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, idx = jax.lax.top_k(probs, cfg.n_experts_used)
    if cfg.norm_topk_prob:
        top = top / top.sum(-1, keepdims=True)
    weights = (jax.nn.one_hot(idx, cfg.n_experts, dtype=top.dtype) * top[..., None]).sum(-2)  # [B, T, E]
    weights = sites.visit("mlp.expert_weights", weights, layer)
    post = activation(jnp.einsum("btd,edf->btef", x, p["W_gate"]), cfg) * jnp.einsum("btd,edf->btef", x, p["W_in"])
    expert_out = sites.visit("mlp.expert_out", jnp.einsum("btef,efd->bted", post, p["W_out"]), layer)
    return jnp.einsum("bte,bted->btd", weights.astype(expert_out.dtype), expert_out)


@jax.named_scope("block")
def block(p: Params, resid: Float[Array, "B T D"], li: LayerInputs, kv: dict, sites: _Sites, cfg: Config
          ) -> tuple[Float[Array, "B T D"], tuple[Float[Array, "B S K d"], Float[Array, "B S K d"]]]:
    """One transformer layer; returns the new residual and this layer's (keys, values)."""
    layer = li.index
    frozen = sites.frozen
    pre = (lambda x, name: norm(x, p[name], cfg, frozen)) if cfg.pre_norms else (lambda x, name: x)  # OLMo 2: none
    resid = sites.visit("resid_pre", resid, layer)
    h = sites.visit("ln1.normalized", pre(resid, "ln1"), layer)
    attn_out, new_kv = attention(p["attn"], h, li, kv, sites, cfg)
    if cfg.post_norms:
        attn_out = norm(attn_out, p["ln1_post"], cfg, frozen)
    attn_out = sites.visit("attn_out", attn_out, layer)
    mlp_in = resid  # parallel block (GPT-NeoX): the MLP reads the layer's input, not resid_mid
    resid = sites.visit("resid_mid", resid + attn_out, layer)
    h = sites.visit("ln2.normalized", pre(mlp_in if cfg.parallel_block else resid, "ln2"), layer)
    mlp_out = moe(p["moe"], h, layer, sites, cfg) if cfg.n_experts else mlp(p["mlp"], h, layer, sites, cfg)
    if cfg.post_norms:
        mlp_out = norm(mlp_out, p["ln2_post"], cfg, frozen)
    mlp_out = sites.visit("mlp_out", mlp_out, layer)
    resid = sites.visit("resid_post", resid + mlp_out, layer)
    return resid, new_kv


# ----------------------------------------------------------------------------- the forward


def default_positions(attention_mask: Int[Array, "B T"]) -> Int[Array, "B T"]:
    """Position ids for a left-padded batch: 0 at each row's first real token (pads get 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)


def embed(params: Params, tokens: Int[Array, "B T"], positions: Int[Array, "B T"], cfg: Config) -> Float[Array, "B T D"]:
    """Token (+ learned position) embeddings, times Gemma's sqrt(d) scale."""
    x = jnp.take(params["embed"]["W_E"], tokens, axis=0)
    if cfg.positional == "learned":
        x = x + jnp.take(params["pos_embed"]["W_pos"], positions, axis=0)
    if cfg.embed_scale != 1.0:
        x = x * jnp.asarray(cfg.embed_scale, x.dtype)
    return x


def unembedding(params: Params) -> Float[Array, "D V"]:
    """The unembedding matrix `W_U [D, V]` (a tied model's: the embedding's transpose)."""
    return params["unembed"]["W_U"] if "unembed" in params else params["embed"]["W_E"].T


def unembed(params: Params, x, cfg: Config) -> Float[Array, "... V"]:
    """Logits (float32, soft-capped) from the final-normed residual `[..., D]`."""
    W_U = unembedding(params)
    logits = jnp.einsum("...d,dv->...v", x, W_U, preferred_element_type=jnp.float32)
    return softcap(logits, cfg.final_softcap)


def _layer_slots(captures: Iterable[Capture]) -> dict[str, tuple[int, ...]]:
    """For each site captured at chosen layers, the distinct layers in order: the scan keeps only those."""
    return {c.site: tuple(sorted(set(c.layers))) for c in captures if c.layers is not None}


def run_layers(params: Params, cfg: Config, resid, sites: _Sites, kv, cache: KVCache | None,
               start: int, stop: int, unroll: bool):
    """Layers [start, stop) on the residual; returns it, the captures and the new cache k/v.

    A site captured at every layer is stacked by the scan `[n, ...]`; one captured at chosen layers is
    written into a buffer of those layers plus one scratch slot that the other layers overwrite, so memory
    follows what was asked for (`[len(set(layers)), ...]`, in sorted layer order)."""
    blocks = jax.tree.map(lambda a: a[start:stop], params["blocks"])
    n = stop - start
    is_local = jnp.asarray([t == "local" for t in cfg.layer_types[start:stop]])
    ck = cv = None
    if cache is not None:
        ck, cv = cache.k[start:stop], cache.v[start:stop]
    xs = (blocks, LayerInputs(jnp.arange(start, stop, dtype=jnp.int32), is_local, ck, cv))
    chosen = _layer_slots(sites.capture.values())
    if sites.head_out_from_z and "attn.head_out" in chosen:  # the scan keeps z; head_out follows from it
        chosen[_Z_FOR_HEAD_OUT] = chosen.pop("attn.head_out")
    # slot of each run layer in a site's buffer; the last slot is scratch for the layers not asked for
    slots = {k: jnp.asarray([ls.index(start + i) if start + i in ls else len(ls) for i in range(n)], jnp.int32)
             for k, ls in chosen.items()}

    def layer(resid, x):
        p, li = x
        layer_sites = _Sites(tuple(sites.capture.values()), sites.interventions, sites.ctx, sites.frozen)
        resid, new_kv = block(p, resid, li, kv, layer_sites, cfg)
        keep = {k: v for k, v in layer_sites.record.items() if k == _Z_FOR_HEAD_OUT or SITES[k].per_layer}
        return resid, keep, new_kv if cache is not None else None

    first = lambda r: layer(r, jax.tree.map(lambda a: a[0], xs))[1]  # chosen layers imply n > 0
    shapes = jax.eval_shape(first, resid) if chosen else {}
    buffers = {k: jnp.zeros((len(chosen[k]) + 1, *shapes[k].shape), shapes[k].dtype) for k in chosen}

    def body(carry, x):
        resid, buffers = carry
        resid, keep, new_kv = layer(resid, x)
        i = x[1].index - start
        buffers = {k: jax.lax.dynamic_update_index_in_dim(b, keep.pop(k), slots[k][i], 0) for k, b in buffers.items()}
        return (resid, buffers), (keep, new_kv)

    if unroll:
        ys = []
        for i in range(n):
            (resid, buffers), y = body((resid, buffers), jax.tree.map(lambda a: a[i], xs))
            ys.append(y)
        rec, new_kv = jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys else ({}, None)
    else:
        (resid, buffers), (rec, new_kv) = jax.lax.scan(body, (resid, buffers), xs)
    rec.update({k: b[:-1] for k, b in buffers.items()})
    return resid, rec, new_kv


def layer_forward(params: Params, cfg: Config, layer: int | Int[Array, ""], resid: Float[Array, "B T D"],
                  attention_mask: Int[Array, "B T"], positions: Int[Array, "B T"], capture: Sequence[str] = (),
                  interventions: Sequence[SiteEdit] = (), *, frozen: bool = False
                  ) -> tuple[Float[Array, "B T D"], dict[str, Array]]:
    """One layer alone (`layer` may be traced, as inside a `lax.fori_loop`) on its `resid_pre` -> its
    `resid_post` and the `capture`d sites of that layer, unstacked (`[B, T, ...]`). The forward's layer step
    as a function, for per-layer backward passes that stop at a chosen depth (`saes.circuits.attribution`)."""
    if not isinstance(layer, jax.core.Tracer) and not 0 <= int(layer) < cfg.n_layers:  # ints, numpy, concrete arrays
        raise InputError(f"layer_forward: layer {int(layer)} is outside [0, {cfg.n_layers})")
    p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), params["blocks"])
    is_local = jnp.asarray([t == "local" for t in cfg.layer_types])[layer]
    li = LayerInputs(jnp.asarray(layer, jnp.int32), is_local, None, None)
    ctx = SiteContext(None, positions, attention_mask, jnp.asarray(0, jnp.int32))
    sites = _Sites(tuple(as_capture(c) for c in capture), interventions, ctx, frozen)
    resid, _ = block(p, resid, li, {"positions": positions, "mask": attention_mask, "index": 0}, sites, cfg)
    return resid, dict(sites.record)


class Output(NamedTuple):
    """What a forward returns: logits (None when it stops before the last layer) and the captures."""

    logits: Float[Array, "B T V"] | None
    acts: dict[str, Array]  # site -> array, layer sites stacked `[layers, ...]` (see `models.sites`)


def forward(
    params: Params,
    cfg: Config,
    tokens: Int[Array, "B T"],
    attention_mask: Int[Array, "B T"] | None = None,
    positions: Int[Array, "B T"] | None = None,
    capture: Sequence[str | Capture | Hook] = (),
    interventions: Sequence[SiteEdit] = (),
    *,
    start_layer: int = 0,
    stop_at_layer: int | None = None,
    resid: Float[Array, "B T D"] | None = None,
    unroll: bool = False,
    frozen: bool = False,
) -> Output:
    """`Output(logits [B, T, V] float32, {site: activation})`.

    `capture` names sites from `models.sites` (or `Capture` objects selecting layers/positions); nothing is
    kept by default. `stop_at_layer=n` runs layers [0, n) and returns `None` logits. `start_layer=l` with
    `resid` (the `resid_pre` of layer l) resumes a forward without recomputing layers < l.
    `frozen=True` stops gradients through every attention pattern and norm scale (values unchanged): the
    forward is then linear in the residual stream apart from the MLPs, the local replacement model of
    attribution graphs (`saes.circuits.attribution`).
    """
    return _forward(params, cfg, tokens, attention_mask, positions, capture, interventions, start_layer=start_layer,
                    stop_at_layer=stop_at_layer, resid=resid, unroll=unroll, frozen=frozen)[0]


def forward_cached(
    params: Params,
    cfg: Config,
    tokens: Int[Array, "B T"],
    attention_mask: Int[Array, "B T"] | None,
    positions: Int[Array, "B T"] | None,
    capture: Sequence[str | Capture | Hook],
    interventions: Sequence[SiteEdit],
    *,
    cache: KVCache,
    step: int | Array = 0,
) -> tuple[Output, KVCache]:
    """A forward of new tokens after those in `cache`: keys/values are written at `cache.index`, attention
    reads every valid cache slot, and the updated cache comes back beside the `Output`. `step` is what
    interventions see as `ctx.step` (0 on the prompt, then 1, 2, ... per generated token). Positions and
    captures are not checked here: `models.generate` checks its prompt with the tokens it will add."""
    return _forward(params, cfg, tokens, attention_mask, positions, capture, interventions, cache=cache, step=step)


def _forward(params, cfg, tokens, attention_mask, positions, capture, interventions, *, start_layer=0,
             stop_at_layer=None, resid=None, cache=None, step=0, unroll=False, frozen=False) -> tuple[Output, KVCache | None]:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise InputError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    B, T = tokens.shape
    if B == 0 or T == 0:
        raise InputError(f"tokens of shape {tokens.shape} hold no token: need at least one row of at least one token")
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), jnp.int32)
    attention_mask = jnp.asarray(attention_mask).astype(jnp.int32)
    if attention_mask.shape != tokens.shape:
        raise InputError(f"attention_mask shape {attention_mask.shape} != tokens shape {tokens.shape}")
    if positions is None:
        positions = default_positions(attention_mask)
    limit = cache.k.shape[2] if cache is not None else T
    if limit > cfg.n_ctx:
        raise InputError(f"input of {limit} positions is longer than the model's context of {cfg.n_ctx}")
    stop = cfg.n_layers if stop_at_layer is None else stop_at_layer
    if not 0 <= start_layer <= stop <= cfg.n_layers:
        raise InputError(f"need 0 <= start_layer ({start_layer}) <= stop_at_layer ({stop}) <= {cfg.n_layers}")

    captures = tuple(as_capture(c) for c in capture)
    if cache is None:  # generate checks its prompt with the tokens it will add
        check_call(cfg, tokens, attention_mask, captures, interventions, start_layer=start_layer, stop_layer=stop)
    ctx = SiteContext(None, positions, attention_mask, jnp.asarray(step, jnp.int32))
    sites = _Sites(captures, interventions, ctx, frozen)

    if cache is None:
        kv = {"positions": positions, "mask": attention_mask, "index": 0}
    else:
        idx = cache.index
        kv = {
            "positions": jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, idx, axis=1),
            "mask": jax.lax.dynamic_update_slice_in_dim(cache.mask, attention_mask, idx, axis=1),
            "index": idx,
        }

    if resid is None:
        if start_layer != 0:
            raise InputError("start_layer > 0 needs the residual stream `resid` entering that layer")
        resid = sites.visit("embed", embed(params, tokens, positions, cfg))
    resid, layer_acts, new_kv = run_layers(params, cfg, resid, sites, kv, cache, start_layer, stop, unroll)

    acts = dict(sites.record)
    # the scan kept every run layer, or a chosen site's distinct layers in sorted order: reorder as asked
    kept = _layer_slots(captures)
    if _Z_FOR_HEAD_OUT in layer_acts:
        W_O = params["blocks"]["attn"]["W_O"]
        W_O = W_O[jnp.asarray(kept["attn.head_out"])] if "attn.head_out" in kept else W_O[start_layer:stop]
        # one dot batched over (layer, head), then one transpose to l b t h d: 0.2 s less than the equivalent
        # einsum "lbthe,lhed->lbthd" on SmolLM2 8x128 (bench.forward (b)), which XLA lowers with more copies
        by_head = jax.lax.dot_general(layer_acts.pop(_Z_FOR_HEAD_OUT), W_O, (((4,), (2,)), ((0, 3), (0, 1))))
        layer_acts["attn.head_out"] = by_head.transpose(0, 2, 3, 1, 4)  # l h b t d -> l b t h d
    for c in captures:
        if c.site in layer_acts and c.site in kept and tuple(c.layers) != kept[c.site]:
            layer_acts[c.site] = layer_acts[c.site][jnp.asarray([kept[c.site].index(l) for l in c.layers])]
    acts.update(layer_acts)
    logits = None
    if stop == cfg.n_layers:
        final = sites.visit("final_norm", norm(resid, params["ln_final"], cfg, frozen))
        acts.update({k: v for k, v in sites.record.items() if k == "final_norm"})
        logits = unembed(params, final, cfg)
    out = Output(logits, {c.site: acts[c.site] for c in captures if c.site in acts})
    if cache is None:
        return out, None
    k, v = new_kv
    new_cache = KVCache(
        cache.k.at[start_layer:stop].set(k), cache.v.at[start_layer:stop].set(v),
        kv["positions"], kv["mask"], cache.index + T,
    )
    return out, new_cache
