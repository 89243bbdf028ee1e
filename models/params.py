"""The parameter pytree: one table of every parameter's logical axes (`PARAMS`, from which shapes,
initialisation and sharding are read), and where each parameter comes from in Hugging Face weights
(`hf_recipes`; the streaming itself is in `models.loading`).

Layout (layer weights stacked on a leading `layers` axis; TransformerLens-style einsum shapes):
    embed.W_E [V, D]             pos_embed.W_pos [n_ctx, D] (learned positions only)
    blocks.ln1.{w,b} [L, D]      blocks.ln1_post / ln2_post (Gemma post-norms)     blocks.ln2.{w,b}
    blocks.attn.W_Q [L, D, H, d] W_K, W_V [L, D, K, d]  W_O [L, H, d, D]  b_Q [L, H, d]  b_K, b_V  b_O [L, D]
    blocks.attn.q_norm.w, k_norm.w [L, d] (Gemma 3, Qwen3)   q_norm_full.w [L, H, d], k_norm_full.w [L, K, d] (OLMo 2)
    blocks.mlp.W_in [L, D, F] (up)  W_gate [L, D, F] (gated only)  W_out [L, F, D]  b_in, b_gate, b_out
    blocks.moe.W_router [L, D, E]  W_gate, W_in [L, E, D, F]  W_out [L, E, F, D] (mixture of experts, in place of mlp)
    ln_final.{w,b} [D]           unembed.W_U [D, V] (absent when embeddings are tied)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from models.config import Config

Params = dict[str, Any]

# The one table of parameters: every parameter's dotted path and its logical axis names, one per dimension.
# Shapes are the config's size of each axis (`param_shapes`), `init_params` initialises from it, and
# `models.sharding` maps the names to mesh axes (`RULES`). Which entries a model has is `param_axes(cfg)`.
_NORM = {"w": ("embed",), "b": ("embed",)}
PARAMS: dict[str, tuple[str, ...]] = {
    "embed.W_E": ("vocab", "embed"),
    "pos_embed.W_pos": ("ctx", "embed"),
    **{f"blocks.{n}.{k}": ("layers", *ax) for n in ("ln1", "ln2", "ln1_post", "ln2_post") for k, ax in _NORM.items()},
    "blocks.attn.W_Q": ("layers", "embed", "heads", "head_dim"),
    "blocks.attn.W_K": ("layers", "embed", "kv_heads", "head_dim"),
    "blocks.attn.W_V": ("layers", "embed", "kv_heads", "head_dim"),
    "blocks.attn.W_O": ("layers", "heads", "head_dim", "embed"),
    "blocks.attn.b_Q": ("layers", "heads", "head_dim"),
    "blocks.attn.b_K": ("layers", "kv_heads", "head_dim"),
    "blocks.attn.b_V": ("layers", "kv_heads", "head_dim"),
    "blocks.attn.b_O": ("layers", "embed"),
    "blocks.attn.q_norm.w": ("layers", "head_dim"),
    "blocks.attn.k_norm.w": ("layers", "head_dim"),
    "blocks.attn.q_norm_full.w": ("layers", "heads", "head_dim"),  # OLMo 2: one norm over all heads
    "blocks.attn.k_norm_full.w": ("layers", "kv_heads", "head_dim"),
    "blocks.mlp.W_in": ("layers", "embed", "mlp"),
    "blocks.mlp.W_gate": ("layers", "embed", "mlp"),
    "blocks.mlp.W_out": ("layers", "mlp", "embed"),
    "blocks.mlp.b_in": ("layers", "mlp"),
    "blocks.mlp.b_gate": ("layers", "mlp"),
    "blocks.mlp.b_out": ("layers", "embed"),
    "blocks.moe.W_router": ("layers", "embed", "expert"),  # mixture of experts (Qwen3-MoE)
    "blocks.moe.W_gate": ("layers", "expert", "embed", "mlp"),
    "blocks.moe.W_in": ("layers", "expert", "embed", "mlp"),
    "blocks.moe.W_out": ("layers", "expert", "mlp", "embed"),
    **{f"ln_final.{k}": ax for k, ax in _NORM.items()},
    "unembed.W_U": ("embed", "vocab"),
}


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in path)


def param_axes(cfg: Config) -> Params:
    """The parameter pytree of `cfg` with each leaf its logical axes (entries of `PARAMS`)."""
    norm = ["w", "b"] if cfg.norm == "layer" else ["w"]
    names = ["embed.W_E", *(["pos_embed.W_pos"] if cfg.positional == "learned" else [])]
    for n in (*(("ln1", "ln2") if cfg.pre_norms else ()), *(("ln1_post", "ln2_post") if cfg.post_norms else ())):
        names += [f"blocks.{n}.{k}" for k in norm]
    names += [f"blocks.attn.{w}" for w in ("W_Q", "W_K", "W_V", "W_O")]
    names += [f"blocks.attn.{b}" for b in ("b_Q", "b_K", "b_V") if cfg.qkv_bias] + ["blocks.attn.b_O"] * cfg.o_bias
    if cfg.qk_norm:
        full = "_full" * cfg.qk_norm_full
        names += [f"blocks.attn.q_norm{full}.w", f"blocks.attn.k_norm{full}.w"]
    mlp = ["W_in", "W_out", *(["W_gate"] if cfg.gated_mlp else [])]
    mlp += ["b_in", "b_out", *(["b_gate"] if cfg.gated_mlp else [])] if cfg.mlp_bias else []
    if cfg.n_experts:
        names += [f"blocks.moe.{w}" for w in ("W_router", "W_gate", "W_in", "W_out")]
    else:
        names += [f"blocks.mlp.{w}" for w in mlp]
    names += [f"ln_final.{k}" for k in norm]
    names += [] if cfg.tie_embeddings else ["unembed.W_U"]
    tree: Params = {}
    for name in names:
        *groups, leaf = name.split(".")
        node = tree
        for g in groups:
            node = node.setdefault(g, {})
        node[leaf] = PARAMS[name]
    return tree


def axis_sizes(cfg: Config) -> dict[str, int]:
    """The size of each logical axis in `cfg`."""
    return {"layers": cfg.n_layers, "embed": cfg.d_model, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
            "head_dim": cfg.d_head, "mlp": cfg.d_mlp, "vocab": cfg.vocab_size, "ctx": cfg.n_ctx,
            "expert": cfg.n_experts}


def logical_axes(params: Params) -> Params:
    """A pytree like `params` whose leaves are tuples of logical axis names (looked up in `PARAMS`)."""

    def axes(path, leaf):
        name = _dotted(path)
        if name not in PARAMS:
            raise KeyError(f"parameter {name!r} is not in models.params.PARAMS")
        return PARAMS[name]

    return jax.tree_util.tree_map_with_path(axes, params)


def param_shapes(cfg: Config) -> Params:
    """Shapes of every parameter for `cfg`: the size of each of its logical axes."""
    sizes = axis_sizes(cfg)
    return jax.tree.map(lambda axes: tuple(sizes[a] for a in axes), param_axes(cfg), is_leaf=_is_axes)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def init_params(cfg: Config, key: jax.Array, scale: float = 0.02) -> Params:
    """Random parameters of the shapes `PARAMS` gives (normal(0, scale) weights, unit norm scales, zero
    biases), for tests and toys."""
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
    if cfg.arch == "gpt_neox":  # (the `gpt_neox.` wrapper is stripped by `hf_name`)
        p = "layers.{i}."
        return {
            "ln1.w": p + "input_layernorm.weight", "ln1.b": p + "input_layernorm.bias",
            "ln2.w": p + "post_attention_layernorm.weight", "ln2.b": p + "post_attention_layernorm.bias",
            "attn.qkv.w": p + "attention.query_key_value.weight", "attn.qkv.b": p + "attention.query_key_value.bias",
            "attn.W_O": p + "attention.dense.weight", "attn.b_O": p + "attention.dense.bias",
            "mlp.W_in": p + "mlp.dense_h_to_4h.weight", "mlp.b_in": p + "mlp.dense_h_to_4h.bias",
            "mlp.W_out": p + "mlp.dense_4h_to_h.weight", "mlp.b_out": p + "mlp.dense_4h_to_h.bias",
        }
    p = "model.layers.{i}."
    names = {
        "attn.qkv.w": p + "self_attn.qkv_proj.weight", "mlp.gate_up.w": p + "mlp.gate_up_proj.weight",  # Phi-3
        "ln1.w": p + "input_layernorm.weight",
        "attn.W_Q": p + "self_attn.q_proj.weight", "attn.W_K": p + "self_attn.k_proj.weight",
        "attn.W_V": p + "self_attn.v_proj.weight", "attn.W_O": p + "self_attn.o_proj.weight",
        "attn.b_Q": p + "self_attn.q_proj.bias", "attn.b_K": p + "self_attn.k_proj.bias",
        "attn.b_V": p + "self_attn.v_proj.bias", "attn.b_O": p + "self_attn.o_proj.bias",
        "attn.q_norm.w": p + "self_attn.q_norm.weight", "attn.k_norm.w": p + "self_attn.k_norm.weight",
        "attn.q_norm_full.w": p + "self_attn.q_norm.weight", "attn.k_norm_full.w": p + "self_attn.k_norm.weight",
        "mlp.W_gate": p + "mlp.gate_proj.weight", "mlp.W_in": p + "mlp.up_proj.weight", "mlp.W_out": p + "mlp.down_proj.weight",
        "mlp.b_gate": p + "mlp.gate_proj.bias", "mlp.b_in": p + "mlp.up_proj.bias", "mlp.b_out": p + "mlp.down_proj.bias",
        "moe.W_router": p + "mlp.gate.weight", "moe.W_gate": p + "mlp.experts.{e}.gate_proj.weight",
        "moe.W_in": p + "mlp.experts.{e}.up_proj.weight", "moe.W_out": p + "mlp.experts.{e}.down_proj.weight",
    }
    if cfg.arch == "mixtral":  # its experts' w1 (gate), w3 (up), w2 (down) and router under block_sparse_moe
        q = p + "block_sparse_moe."
        names.update({"moe.W_router": q + "gate.weight", "moe.W_gate": q + "experts.{e}.w1.weight",
                      "moe.W_in": q + "experts.{e}.w3.weight", "moe.W_out": q + "experts.{e}.w2.weight"})
    if cfg.post_norms and not cfg.pre_norms:  # OLMo 2: norms after attention and MLP only
        names.update({"ln1_post.w": p + "post_attention_layernorm.weight",
                      "ln2_post.w": p + "post_feedforward_layernorm.weight"})
    elif cfg.post_norms:
        names.update({"ln1_post.w": p + "post_attention_layernorm.weight", "ln2.w": p + "pre_feedforward_layernorm.weight",
                      "ln2_post.w": p + "post_feedforward_layernorm.weight"})
    else:
        names["ln2.w"] = p + "post_attention_layernorm.weight"
    return names


_WRAPPERS = (("transformer.", ""), ("model.language_model.", "model."), ("language_model.model.", "model."),
             ("gpt_neox.", ""))


def hf_name(name: str) -> str:
    """A Hugging Face tensor name without wrapper prefixes (`transformer.`, `model.language_model.`), as
    `_hf_layer_names` spells it."""
    for pre, repl in _WRAPPERS:
        if name.startswith(pre):
            return repl + name[len(pre):]
    return name


@dataclass(frozen=True)
class Recipe:
    """How one parameter is read from a Hugging Face tensor (torch layout).

    `source` is the tensor name (`{i}` stands for the layer of a stacked parameter) of shape `source_shape`
    (per layer). Our layout is the source reshaped to `split`, with `take = (axis, j)` keeping part `j` of a
    fused tensor along that axis (GPT-2's c_attn), then its axes permuted by `perm` (our axis k is split axis
    `perm[k]`). So a block of the parameter is a block of the reshaped source (`models.loading` reads just that,
    and transposes and converts it on the host as it copies it). `plus_one`: Gemma's `(1 + w)` norm weight.
    `rows`: only the source's rows `[a, b)` are reshaped to `split` (parts of unequal size, Phi-3's fused qkv
    with grouped-query attention).
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    source: str
    source_shape: tuple[int, ...]
    split: tuple[int, ...]
    perm: tuple[int, ...]
    stacked: bool
    take: tuple[int, int] | None = None
    plus_one: bool = False
    rows: tuple[int, int] | None = None  # the source's rows [a, b) this parameter reads (Phi-3's fused qkv)
    experts: int = 0  # > 0: one source per (layer, expert), `{e}` in `source`; our axis after `layers` is the expert

    def sources(self, n_layers: int) -> list[str]:
        if self.experts:
            return [self.source.format(i=i, e=e) for i in range(n_layers) for e in range(self.experts)]
        return [self.source.format(i=i) for i in range(n_layers)] if self.stacked else [self.source]


def hf_recipes(cfg: Config) -> list[Recipe]:
    """One `Recipe` per parameter of `param_shapes(cfg)`: which Hugging Face tensor it comes from and how."""
    H, K, d, D, F = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model, cfg.d_mlp
    gemma, gpt2, neox = cfg.arch in ("gemma2", "gemma3"), cfg.arch == "gpt2", cfg.arch == "gpt_neox"
    phi3 = cfg.arch == "phi3"
    names = _hf_layer_names(cfg)
    if gpt2:  # Conv1D weights are [in, out]; q, k and v share c_attn [D, 3D]
        qkv = {f"{k}_{n}": j for j, n in enumerate("QKV") for k in ("W", "b")}
        layer = {"attn.W_O": ((H * d, D), (H, d, D), (0, 1, 2))}
    else:
        heads = lambda n: ((n * d, D), (n, d, D), (2, 0, 1))
        layer = {"attn.W_Q": heads(H), "attn.W_K": heads(K), "attn.W_V": heads(K),
                 "attn.W_O": ((D, H * d), (D, H, d), (1, 2, 0)),
                 "attn.b_Q": ((H * d,), (H, d), (0, 1)), "attn.b_K": ((K * d,), (K, d), (0, 1)),
                 "attn.b_V": ((K * d,), (K, d), (0, 1)),
                 "mlp.W_gate": ((F, D), (F, D), (1, 0)), "mlp.W_in": ((F, D), (F, D), (1, 0)),
                 "mlp.W_out": ((D, F), (D, F), (1, 0)),
                 "attn.q_norm_full.w": ((H * d,), (H, d), (0, 1)), "attn.k_norm_full.w": ((K * d,), (K, d), (0, 1))}
    if gpt2:
        top = {"embed.W_E": "wte.weight", "pos_embed.W_pos": "wpe.weight", "ln_final.w": "ln_f.weight", "ln_final.b": "ln_f.bias"}
    elif neox:
        top = {"embed.W_E": "embed_in.weight", "ln_final.w": "final_layer_norm.weight", "ln_final.b": "final_layer_norm.bias"}
    else:
        top = {"embed.W_E": "model.embed_tokens.weight", "ln_final.w": "model.norm.weight"}
    top["unembed.W_U"] = "embed_out.weight" if neox else "lm_head.weight"
    same = lambda shape: (shape, shape, tuple(range(len(shape))))
    out = []
    for keys, shape in jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=_is_shape)[0]:
        path = tuple(k.key for k in keys)
        ours = ".".join(path[1:] if path[0] == "blocks" else path)
        plus_one = gemma and path[-1] == "w" and (path[-2].startswith("ln") or path[-2].endswith("norm"))
        if path[0] != "blocks":
            src, split, perm = (shape[::-1], shape[::-1], (1, 0)) if ours == "unembed.W_U" else same(shape)
            out.append(Recipe(path, shape, top[ours], src, split, perm, False, plus_one=plus_one))
        elif neox and path[-1] in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V"):
            # fused query_key_value [H * 3 * d, D]: each head's q, k, v side by side (HF views it as [H, 3d])
            j, weight = "QKV".index(path[-1][-1]), path[-1].startswith("W")
            src = names["attn.qkv.w" if weight else "attn.qkv.b"]
            out.append(Recipe(path, shape, src, (3 * H * d, D) if weight else (3 * H * d,),
                              (H, 3, d, D) if weight else (H, 3, d), (2, 0, 1) if weight else (0, 1), True,
                              take=(1, j)))
        elif phi3 and path[-1] in ("W_Q", "W_K", "W_V"):  # qkv_proj [(H + 2K) d, D]: q, then k, then v
            n, start = {"W_Q": (H, 0), "W_K": (K, H * d), "W_V": (K, (H + K) * d)}[path[-1]]
            out.append(Recipe(path, shape, names["attn.qkv.w"], ((H + 2 * K) * d, D), (n, d, D), (2, 0, 1), True,
                              rows=(start, start + n * d)))
        elif phi3 and path[-1] in ("W_gate", "W_in"):  # gate_up_proj [2F, D]: the gate, then the up projection
            out.append(Recipe(path, shape, names["mlp.gate_up.w"], (2 * F, D), (2, F, D), (1, 0), True,
                              take=(0, 0 if path[-1] == "W_gate" else 1)))
        elif path[1] == "moe" and path[-1] != "W_router":  # one [F, D] / [D, F] tensor per expert
            src, split, perm = layer["mlp." + path[-1]]
            out.append(Recipe(path, shape, names[ours], src, split, perm, True, experts=cfg.n_experts))
        elif path[1] == "moe":  # the router, torch [E, D]
            E = cfg.n_experts
            out.append(Recipe(path, shape, names[ours], (E, D), (E, D), (1, 0), True))
        elif gpt2 and path[-1] in qkv:
            j, weight = qkv[path[-1]], path[-1].startswith("W")
            src = names["attn.c_attn.w" if weight else "attn.c_attn.b"]
            out.append(Recipe(path, shape, src, (D, 3 * D) if weight else (3 * D,), (D, 3, H, d) if weight else (3, H, d),
                              (0, 1, 2) if weight else (0, 1), True, take=(1, j) if weight else (0, j)))
        else:
            src, split, perm = layer.get(ours, same(shape[1:]))
            out.append(Recipe(path, shape, names[ours], src, split, perm, True, plus_one=plus_one))
    return out
