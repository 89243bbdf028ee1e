"""The parameter pytree: layout, logical axis names, random init, and conversion from Hugging Face weights.

Layout (layer weights stacked on a leading `layers` axis; TransformerLens-style einsum shapes):
    embed.W_E [V, D]             pos_embed.W_pos [n_ctx, D] (learned positions only)
    blocks.ln1.{w,b} [L, D]      blocks.ln1_post / ln2_post (Gemma post-norms)     blocks.ln2.{w,b}
    blocks.attn.W_Q [L, D, H, d] W_K, W_V [L, D, K, d]  W_O [L, H, d, D]  b_Q [L, H, d]  b_K, b_V  b_O [L, D]
    blocks.attn.q_norm.w, k_norm.w [L, d] (Gemma 3)
    blocks.mlp.W_in [L, D, F] (up)  W_gate [L, D, F] (gated only)  W_out [L, F, D]  b_in, b_gate, b_out
    ln_final.{w,b} [D]           unembed.W_U [D, V], unembed.b_U [V] (absent when embeddings are tied)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from models.config import Config
from models.errors import ModelFileError

Params = dict[str, Any]

# Logical axis names of every parameter, by the last key of its path (see models.sharding for the mesh table).
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "W_E": ("vocab", "embed"),
    "W_pos": ("ctx", "embed"),
    "W_Q": ("layers", "embed", "heads", "head_dim"),
    "W_K": ("layers", "embed", "kv_heads", "head_dim"),
    "W_V": ("layers", "embed", "kv_heads", "head_dim"),
    "W_O": ("layers", "heads", "head_dim", "embed"),
    "b_Q": ("layers", "heads", "head_dim"),
    "b_K": ("layers", "kv_heads", "head_dim"),
    "b_V": ("layers", "kv_heads", "head_dim"),
    "b_O": ("layers", "embed"),
    "W_in": ("layers", "embed", "mlp"),
    "W_gate": ("layers", "embed", "mlp"),
    "W_out": ("layers", "mlp", "embed"),
    "b_in": ("layers", "mlp"),
    "b_gate": ("layers", "mlp"),
    "b_out": ("layers", "embed"),
    "W_U": ("embed", "vocab"),
    "b_U": ("vocab",),
}


def logical_axes(params: Params) -> Params:
    """A pytree like `params` whose leaves are tuples of logical axis names."""

    def axes(path, leaf):
        keys = [p.key for p in path]
        name = keys[-1]
        if name in LOGICAL_AXES:
            return LOGICAL_AXES[name]
        per_layer = keys[0] == "blocks"  # norm weights and biases
        return (("layers",) if per_layer else ()) + ("head_dim" if keys[-2] in ("q_norm", "k_norm") else "embed",)

    return jax.tree_util.tree_map_with_path(axes, params)


def param_shapes(cfg: Config) -> Params:
    """Shapes of every parameter for `cfg`."""
    L, D, H, K, d, F, V = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.vocab_size
    norm = lambda *lead: {"w": (*lead, D), **({"b": (*lead, D)} if cfg.norm == "layer" else {})}
    attn = {"W_Q": (L, D, H, d), "W_K": (L, D, K, d), "W_V": (L, D, K, d), "W_O": (L, H, d, D)}
    if cfg.qkv_bias:
        attn.update(b_Q=(L, H, d), b_K=(L, K, d), b_V=(L, K, d))
    if cfg.o_bias:
        attn["b_O"] = (L, D)
    if cfg.qk_norm:
        attn.update(q_norm={"w": (L, d)}, k_norm={"w": (L, d)})
    mlp = {"W_in": (L, D, F), "W_out": (L, F, D)}
    if cfg.gated_mlp:
        mlp["W_gate"] = (L, D, F)
    if cfg.mlp_bias:
        mlp.update(b_in=(L, F), b_out=(L, D), **({"b_gate": (L, F)} if cfg.gated_mlp else {}))
    blocks = {"ln1": norm(L), "attn": attn, "ln2": norm(L), "mlp": mlp}
    if cfg.post_norms:
        blocks.update(ln1_post=norm(L), ln2_post=norm(L))
    shapes = {"embed": {"W_E": (V, D)}, "blocks": blocks, "ln_final": norm()}
    if cfg.positional == "learned":
        shapes["pos_embed"] = {"W_pos": (cfg.n_ctx, D)}
    if not cfg.tie_embeddings:
        shapes["unembed"] = {"W_U": (D, V)}
    return shapes


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def init_params(cfg: Config, key: jax.Array, scale: float = 0.02) -> Params:
    """Random parameters (normal(0, scale) weights, unit norm scales, zero biases), for tests and toys."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]]
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(cfg.dtype)

    def make(path, shape, k):
        if "'w'" in path:
            return jnp.ones(shape, dtype)
        if "'b" in path:
            return jnp.zeros(shape, dtype)
        return (scale * jax.random.normal(k, shape)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(p, s, k) for p, s, k in zip(paths, leaves, keys)])


def check_shapes(params: Params, cfg: Config, source: str) -> None:
    """Raise `ModelFileError` naming every parameter whose shape differs from what `cfg` implies."""
    want = param_shapes(cfg)
    flat_want = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(want, is_leaf=_is_shape)[0]}
    flat_have = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    problems = [f"{k}: missing" for k in flat_want if k not in flat_have]
    problems += [f"{k}: shape {flat_have[k]} != {flat_want[k]}" for k in flat_want if k in flat_have and flat_have[k] != flat_want[k]]
    problems += [f"{k}: unexpected" for k in flat_have if k not in flat_want]
    if problems:
        raise ModelFileError(f"weights in {source} do not match the config: " + "; ".join(problems[:8]))


# ----------------------------------------------------------------------------- Hugging Face names


def _hf_layer_names(cfg: Config) -> dict[str, str]:
    """Our per-layer parameter path -> the Hugging Face tensor name (with `{i}` for the layer)."""
    if cfg.arch == "gpt2":
        p = "h.{i}."
        return {
            "ln1.w": p + "ln_1.weight", "ln1.b": p + "ln_1.bias", "ln2.w": p + "ln_2.weight", "ln2.b": p + "ln_2.bias",
            "attn.c_attn.w": p + "attn.c_attn.weight", "attn.c_attn.b": p + "attn.c_attn.bias",
            "attn.W_O": p + "attn.c_proj.weight", "attn.b_O": p + "attn.c_proj.bias",
            "mlp.W_in": p + "mlp.c_fc.weight", "mlp.b_in": p + "mlp.c_fc.bias",
            "mlp.W_out": p + "mlp.c_proj.weight", "mlp.b_out": p + "mlp.c_proj.bias",
        }
    p = "model.layers.{i}."
    names = {
        "ln1.w": p + "input_layernorm.weight",
        "attn.W_Q": p + "self_attn.q_proj.weight", "attn.W_K": p + "self_attn.k_proj.weight",
        "attn.W_V": p + "self_attn.v_proj.weight", "attn.W_O": p + "self_attn.o_proj.weight",
        "attn.b_Q": p + "self_attn.q_proj.bias", "attn.b_K": p + "self_attn.k_proj.bias",
        "attn.b_V": p + "self_attn.v_proj.bias", "attn.b_O": p + "self_attn.o_proj.bias",
        "attn.q_norm.w": p + "self_attn.q_norm.weight", "attn.k_norm.w": p + "self_attn.k_norm.weight",
        "mlp.W_gate": p + "mlp.gate_proj.weight", "mlp.W_in": p + "mlp.up_proj.weight", "mlp.W_out": p + "mlp.down_proj.weight",
        "mlp.b_gate": p + "mlp.gate_proj.bias", "mlp.b_in": p + "mlp.up_proj.bias", "mlp.b_out": p + "mlp.down_proj.bias",
    }
    if cfg.post_norms:
        names.update({"ln1_post.w": p + "post_attention_layernorm.weight", "ln2.w": p + "pre_feedforward_layernorm.weight",
                      "ln2_post.w": p + "post_feedforward_layernorm.weight"})
    else:
        names["ln2.w"] = p + "post_attention_layernorm.weight"
    return names


def _strip_prefix(sd: Mapping[str, np.ndarray], cfg: Config) -> dict[str, np.ndarray]:
    """Drop wrapper prefixes (`transformer.`, `model.language_model.`) so names match `_hf_layer_names`."""
    out = {}
    for k, v in sd.items():
        for pre, repl in (("transformer.", ""), ("model.language_model.", "model."), ("language_model.model.", "model.")):
            if k.startswith(pre):
                k = repl + k[len(pre):]
                break
        out[k] = v
    return out


def from_hf_state_dict(sd: Mapping[str, np.ndarray], cfg: Config, source: str = "state dict") -> Params:
    """Convert Hugging Face tensors (`torch` layouts, as numpy) into our stacked pytree, then check shapes.

    Gemma norm weights arrive as `w` for a `(1 + w)` norm and are stored as `1 + w`.
    """
    sd = _strip_prefix(sd, cfg)
    H, K, d, D = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model
    gemma = cfg.arch in ("gemma2", "gemma3")
    gpt2 = cfg.arch == "gpt2"

    def get(name):
        if name not in sd:
            raise ModelFileError(f"{source}: tensor {name!r} is missing")
        return np.asarray(sd[name], np.float32)

    def layer_tensor(ours: str, template: str) -> np.ndarray:
        ws = [get(template.format(i=i)) for i in range(cfg.n_layers)]
        w = np.stack(ws)
        leaf = ours.split(".")[-1]
        if ours.endswith("norm.w") or ours.split(".")[0] in ("ln1", "ln2", "ln1_post", "ln2_post"):
            return w + 1.0 if gemma and leaf == "w" else w
        if gpt2:  # Conv1D weights are [in, out]
            if ours == "attn.W_O":
                return w.reshape(-1, H, d, D)
            return w
        if ours == "attn.W_Q":
            return w.reshape(-1, H, d, D).transpose(0, 3, 1, 2)
        if ours in ("attn.W_K", "attn.W_V"):
            return w.reshape(-1, K, d, D).transpose(0, 3, 1, 2)
        if ours == "attn.W_O":
            return w.transpose(0, 2, 1).reshape(-1, H, d, D)
        if ours == "attn.b_Q":
            return w.reshape(-1, H, d)
        if ours in ("attn.b_K", "attn.b_V"):
            return w.reshape(-1, K, d)
        if ours in ("mlp.W_gate", "mlp.W_in", "mlp.W_out"):
            return w.transpose(0, 2, 1)
        return w

    shapes = param_shapes(cfg)
    blocks: Params = {}
    names = _hf_layer_names(cfg)
    for ours, template in names.items():
        group, leaf = ours.split(".", 1)
        if gpt2 and leaf.startswith("c_attn"):
            continue
        node = shapes["blocks"].get(group, {})
        for part in leaf.split(".")[:-1]:
            node = node.get(part, {})
        if leaf.split(".")[-1] not in node:
            continue
        target = blocks.setdefault(group, {})
        for part in leaf.split(".")[:-1]:
            target = target.setdefault(part, {})
        target[leaf.split(".")[-1]] = layer_tensor(ours, template)
    if gpt2:
        w = layer_tensor("attn.c_attn.w", names["attn.c_attn.w"])  # [L, D, 3D]
        b = layer_tensor("attn.c_attn.b", names["attn.c_attn.b"])  # [L, 3D]
        for j, n in enumerate("QKV"):
            blocks["attn"]["W_" + n] = w[:, :, j * D:(j + 1) * D].reshape(-1, D, H, d)
            blocks["attn"]["b_" + n] = b[:, j * D:(j + 1) * D].reshape(-1, H, d)

    params: Params = {"blocks": blocks}
    if gpt2:
        params["embed"] = {"W_E": get("wte.weight")}
        params["pos_embed"] = {"W_pos": get("wpe.weight")}
        params["ln_final"] = {"w": get("ln_f.weight"), "b": get("ln_f.bias")}
    else:
        params["embed"] = {"W_E": get("model.embed_tokens.weight")}
        w = get("model.norm.weight")
        params["ln_final"] = {"w": w + 1.0 if gemma else w}
    if not cfg.tie_embeddings:
        params["unembed"] = {"W_U": get("lm_head.weight").T}
    params["embed"]["W_E"] = params["embed"]["W_E"][: cfg.vocab_size]
    check_shapes(params, cfg, source)
    dtype = jnp.dtype(cfg.dtype)
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
