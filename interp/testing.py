"""Tiny random models for tests, examples and toys."""

from __future__ import annotations

import jax

import models


def random_model(cfg: models.Config, key: jax.Array, scale: float = 0.2, bias_scale: float = 0.05) -> models.Model:
    """A `models.Model` (no tokenizer) with normal(0, `scale`) weights, normal(0, `bias_scale`) biases and
    unit norm scales. (Draws every leaf itself: `models.init_params` is only used for the layout.)"""
    params = models.init_params(cfg, key)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(flat))

    def draw(path, leaf, k):
        name = path[-1].key
        if name == "w":
            return leaf
        return (scale if name.startswith("W") else bias_scale) * jax.random.normal(k, leaf.shape, leaf.dtype)

    return models.Model(jax.tree.unflatten(treedef, [draw(p, x, k) for (p, x), k in zip(flat, keys)]), cfg, None, "random")
