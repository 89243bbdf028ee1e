"""Tiny random models for tests, examples and toys: every tiny config of the suite comes from `tiny_config`.

    cfg = tiny_config("llama", vocab_size=40)          # a preset with overrides
    m = random_model(cfg, jax.random.key(0))           # seeded random weights, no tokenizer
"""

from __future__ import annotations

import jax

from models.config import ARCHS, Config
from models.model import Model
from models.params import init_params

_TINY = {
    "llama": dict(arch="llama", vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=48,
                  n_ctx=64),
    "gpt2": dict(arch="gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_head=8, d_mlp=64,
                 n_ctx=64, norm="layer", act="gelu_tanh", gated_mlp=False, positional="learned", qkv_bias=True,
                 o_bias=True, mlp_bias=True),
    "gemma3": dict(arch="gemma3", vocab_size=64, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, d_head=16, d_mlp=48,
                   n_ctx=64, act="gelu_tanh", post_norms=True, qk_norm=True, embed_scale=32**0.5,
                   rope_local_theta=10_000.0, rope_theta=1e6, sliding_window=4, layer_types=("local", "local", "global")),
}


def tiny_config(arch: str = "llama", **overrides) -> Config:
    """A tiny `models.Config` of family `arch` with `overrides` applied. Presets: `llama` (GQA, gated SiLU MLP,
    RoPE), `gpt2` (LayerNorm, learned positions, biases), `gemma3` (post-norms, QK-norm, local/global layers);
    any other family of `models.config.ARCHS` starts from the llama preset with its `arch` (set its own switches
    in `overrides`)."""
    if arch not in ARCHS:
        raise KeyError(f"no family {arch!r}; families: {', '.join(ARCHS)} (presets: {', '.join(_TINY)})")
    return Config(**{**_TINY.get(arch, _TINY["llama"]), "arch": arch, **overrides})


def random_model(cfg: Config, key: jax.Array, scale: float = 0.2, bias_scale: float = 0.05) -> Model:
    """A `models.Model` (no tokenizer) with normal(0, `scale`) weights, normal(0, `bias_scale`) biases and
    unit norm scales. (Draws every leaf itself: `models.init_params` is only used for the layout.)"""
    params = init_params(cfg, key)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(flat))

    def draw(path, leaf, k):
        name = path[-1].key
        if name == "w":
            return leaf
        return (scale if name.startswith("W") else bias_scale) * jax.random.normal(k, leaf.shape, leaf.dtype)

    return Model(jax.tree.unflatten(treedef, [draw(p, x, k) for (p, x), k in zip(flat, keys)]), cfg, None, "random")
