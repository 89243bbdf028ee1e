"""Weight-space edits: bake a directional ablation into the parameters.

    ablated = orthogonalize(model, r)     # same logits as interventions=directional_ablation(r)
"""

from __future__ import annotations

import jax.numpy as jnp

from models.errors import InputError

__all__ = ["orthogonalize", "orthogonalize_params"]

# Parameters that write into the residual stream, with their output (d_model) axis last.
_WRITERS = (("embed", "W_E"), ("pos_embed", "W_pos"), ("blocks", "attn", "W_O"), ("blocks", "attn", "b_O"),
            ("blocks", "mlp", "W_out"), ("blocks", "mlp", "b_out"))


def _remove(w, r):
    w32 = w.astype(jnp.float32)
    return (w32 - (w32 @ r)[..., None] * r).astype(w.dtype)


def orthogonalize_params(params: dict, cfg, direction) -> tuple[dict, object]:
    """`(params, cfg)` whose embedding, positional embedding, attention and MLP output projections and their
    biases write nothing along `direction` [D]. A tied unembedding is untied first (an explicit
    `unembed.W_U` copy, `cfg.tie_embeddings=False`) so the readout is unchanged."""
    if cfg.post_norms:
        raise InputError("post-norm models (Gemma 2/3) normalise each block's output after W_O/W_out, so "
                         "orthogonalising those weights is not a directional ablation; use the interventions")
    r = jnp.asarray(direction, jnp.float32)
    r = r / jnp.linalg.norm(r)
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in params.items()}
    out["blocks"] = {k: dict(v) if isinstance(v, dict) else v for k, v in params["blocks"].items()}
    if "unembed" not in params:
        out["unembed"] = {"W_U": params["embed"]["W_E"].T}
        cfg = cfg.replace(tie_embeddings=False)
    for path in _WRITERS:
        node = out
        for key in path[:-1]:
            node = node.get(key, {})
        if path[-1] in node:
            node[path[-1]] = _remove(node[path[-1]], r)
    return out, cfg


def orthogonalize(model, direction):
    """A `models.Model` with `orthogonalize_params` applied (new params and config, same tokenizer)."""
    params, cfg = orthogonalize_params(model.params, model.cfg, direction)
    return type(model)(params, cfg, model.tokenizer, model.name)
