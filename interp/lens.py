"""Lenses: the logit lens, the residual stream as a sum of components, and direct logit attribution.

    lens = logit_lens(model, tokens, mask)                      # [L, B, 1, V]: each layer's resid_post read out
    dec = residual_decomposition(model, tokens, mask)           # embed + heads (+ b_O) + MLPs == final residual
    dla = direct_logit_attribution(model, tokens, mask, unembed_direction(model, ok, bad))
    dla.heads                                                   # [L, B, H]: each head's share of logit[ok] - logit[bad]
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from interp.readout import as_positions, logits_from_resid
import models
from models.checks import check_call, check_positions, check_tokens, row_lengths
from models.transformer import Capture

__all__ = ["DLA", "Decomposition", "direct_logit_attribution", "logit_lens", "residual_decomposition", "unembed_direction"]


def _check(model, tokens, mask, positions) -> None:
    """Token ids and the read `positions` (in every row) checked before anything is traced."""
    check_call(model.cfg, tokens, mask)
    if positions is not None:
        check_positions("positions", np.asarray(positions), row_lengths(mask), int(tokens.shape[1]))


@eqx.filter_jit
def _lens(model, tokens, mask, site: str, positions):
    acts = models.forward(model, tokens, mask, None, (Capture(site, positions=positions),)).acts
    return logits_from_resid(model.params, model.cfg, acts[site])


def logit_lens(model, tokens, mask=None, *, site: str = "resid_post", positions: Sequence[int] | None = (-1,)):
    """Each layer's residual (`site`: resid_pre, resid_mid or resid_post) through the final norm and the
    unembedding: `[L, B, P, V]` logits at `positions`, the `p`-th real token of each row (-1 = each row's last;
    `None`: every sequence index, memory L*B*T*V)."""
    tokens, positions = jnp.asarray(tokens), as_positions(positions)
    _check(model, tokens, mask, positions)
    return _lens(model, tokens, mask, site, positions)


class Decomposition(NamedTuple):
    """The final residual `[B, P, D]` as `embed + sum(attn_out) + sum(mlp_out)`; for models without post-norms
    each `attn_out[l]` is further `sum_h heads[l, :, :, h] + attn_bias[l]`."""

    embed: Float[Array, "B P D"]
    attn_out: Float[Array, "L B P D"]
    mlp_out: Float[Array, "L B P D"]
    heads: Float[Array, "L B P H D"] | None  # None with post-norms (Gemma): heads are normalised together
    attn_bias: Float[Array, "L D"] | None
    resid: Float[Array, "B P D"]  # the final residual (resid_post of the last layer), for checking

    def total(self) -> Array:
        return self.embed + self.attn_out.sum(0) + self.mlp_out.sum(0)


@eqx.filter_jit
def _decompose(model, tokens, mask, positions):
    cfg = model.cfg
    sites = ["embed", "attn_out", "mlp_out", "resid_post"] + ([] if cfg.post_norms else ["attn.head_out"])
    caps = tuple(Capture(s, layers=(cfg.n_layers - 1,) if s == "resid_post" else None, positions=positions) for s in sites)
    acts = models.forward(model, tokens, mask, None, caps).acts
    bias = model.params["blocks"]["attn"].get("b_O") if not cfg.post_norms else None
    if bias is None and not cfg.post_norms:
        bias = jnp.zeros((cfg.n_layers, cfg.d_model), acts["embed"].dtype)
    return Decomposition(acts["embed"], acts["attn_out"], acts["mlp_out"], acts.get("attn.head_out"), bias,
                         acts["resid_post"][0])


def residual_decomposition(model, tokens, mask=None, *, positions: Sequence[int] | None = (-1,)) -> Decomposition:
    """Every component writing into the residual stream at `positions`, the `p`-th real token of each row
    (-1 = each row's last; `None`: every sequence index)."""
    tokens, positions = jnp.asarray(tokens), as_positions(positions)
    _check(model, tokens, mask, positions)
    return _decompose(model, tokens, mask, positions)


def unembed_direction(model, correct, wrong=None) -> Array:
    """Unembedding column(s) `W_U[:, correct] - W_U[:, wrong]`: `[D]` or `[B, D]` for per-row ids (one id each:
    `model.to_single_token(" Paris")`). Ids outside the vocabulary raise InputError."""
    p = model.params
    W_U = p["unembed"]["W_U"] if "unembed" in p else p["embed"]["W_E"].T
    check_tokens(correct, W_U.shape[1], "unembed_direction correct")
    d = jnp.take(W_U, jnp.asarray(correct), axis=1)
    if wrong is not None:
        check_tokens(wrong, W_U.shape[1], "unembed_direction wrong")
        d = d - jnp.take(W_U, jnp.asarray(wrong), axis=1)
    return jnp.moveaxis(d, 0, -1).astype(jnp.float32)


class DLA(NamedTuple):
    """Direct logit attribution at one position: each component's share of the logit along a direction,
    after the final norm's scale (frozen at its value on the real run). `total()` equals the logit (before
    the final soft-cap) of the direction, biases included."""

    embed: Float[Array, " B"]
    attn: Float[Array, "L B"]
    mlp: Float[Array, "L B"]
    heads: Float[Array, "L B H"] | None
    attn_bias: Float[Array, "L B"] | None
    constant: Float[Array, " B"]  # final-norm and unembedding biases along the direction

    def total(self) -> Array:
        return self.embed + self.attn.sum(0) + self.mlp.sum(0) + self.constant


def direct_logit_attribution(model, tokens, mask, direction: Float[Array, "*B D"], *, position: int = -1) -> DLA:
    """Attribute `resid . W_U`-style logits along `direction` (`[D]` or `[B, D]`, see `unembed_direction`) at
    `position` (the `position`-th real token of each row; -1 = each row's last) to the embedding, every head
    (and `b_O`) and every MLP."""
    cfg, p = model.cfg, model.params
    dec = residual_decomposition(model, tokens, mask, positions=(position,))
    d = jnp.broadcast_to(jnp.asarray(direction, jnp.float32), (dec.resid.shape[0], cfg.d_model))  # [B, D]
    x = dec.resid[:, 0].astype(jnp.float32)
    center = cfg.norm == "layer"
    if center:
        x = x - x.mean(-1, keepdims=True)
    scale = jax.lax.rsqrt(jnp.mean(x * x, -1) + cfg.norm_eps)  # [B]
    w = p["ln_final"]["w"].astype(jnp.float32)

    def through_norm(c):  # c [..., B, D] -> [..., B]
        c = c.astype(jnp.float32)
        if center:
            c = c - c.mean(-1, keepdims=True)
        return jnp.sum(c * scale[:, None] * w * d, -1)

    constant = jnp.zeros(d.shape[0])
    if "b" in p["ln_final"]:
        constant = constant + d @ p["ln_final"]["b"].astype(jnp.float32)
    heads = bias = None
    if dec.heads is not None:
        heads = jnp.moveaxis(through_norm(jnp.moveaxis(dec.heads[:, :, 0], 2, 1)), 1, 2)  # [L, H, B] -> [L, B, H]
        bias = through_norm(jnp.broadcast_to(dec.attn_bias[:, None], (cfg.n_layers,) + d.shape))
    return DLA(through_norm(dec.embed[:, 0]), through_norm(dec.attn_out[:, :, 0]), through_norm(dec.mlp_out[:, :, 0]),
               heads, bias, constant)
