"""What a metric sees: the final residual and the logits at chosen positions, and ready-made metrics.

A metric is any function `metric(Readout) -> scalar` (averaged over the batch). Metrics defined here are
equinox modules, so their arrays (target token ids, a direction) are traced, not baked into the program:
sweeps with a new metric of the same kind reuse the compiled code.

    r = readout(model, tokens, mask)           # Readout(logits [B, 1, V], resid [B, 1, D]) at the last position
    LogitDiff(correct_ids, wrong_ids)(r)       # mean over the batch of logit[correct] - logit[wrong]
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from models import transformer
from models.transformer import Capture

__all__ = ["LogitDiff", "NextTokenLoss", "Projection", "Readout", "TokenLogProb", "logits_from_resid", "readout", "readout_with"]


class Readout(NamedTuple):
    logits: Float[Array, "B P V"]  # float32, after the final norm, unembedding and soft-cap
    resid: Float[Array, "B P D"]  # residual stream leaving the last layer (before the final norm)


def normalize_positions(positions: Sequence[int] | None, seq_len: int) -> tuple[int, ...] | None:
    """Sequence indices made non-negative (`-1` = the last index), `None` kept for all positions."""
    return None if positions is None else tuple(int(p) % seq_len for p in positions)


def logits_from_resid(params, cfg, resid: Float[Array, "... D"]) -> Float[Array, "... V"]:
    """The final norm, unembedding and soft-cap applied to any residual (the logit lens)."""
    shape = resid.shape
    flat = resid.reshape(1, -1, shape[-1])
    logits = transformer.unembed(params, transformer.norm(flat, params["ln_final"], cfg), cfg)
    return logits.reshape(*shape[:-1], -1)


def readout_with(model, tokens, mask=None, interventions=(), positions: Sequence[int] | None = (-1,), capture=(), *,
                 start_layer: int = 0, resid=None) -> tuple[Readout, dict]:
    """`readout` plus the activations named in `capture` (as `models.forward` returns them)."""
    cfg = model.cfg
    pos = normalize_positions(positions, tokens.shape[1])
    final = (Capture("resid_post", layers=(cfg.n_layers - 1,), positions=pos), Capture("final_norm", positions=pos))
    extra = tuple(c for c in capture if (c.site if isinstance(c, Capture) else c) not in ("resid_post", "final_norm"))
    if len(extra) != len(capture):
        raise ValueError("readout_with captures resid_post/final_norm itself; capture them with models.forward")
    _, acts = transformer.forward(model.params, cfg, tokens, mask, None, final + extra, tuple(interventions),
                                  start_layer=start_layer, resid=resid)
    logits = transformer.unembed(model.params, acts.pop("final_norm"), cfg)
    return Readout(logits, acts.pop("resid_post")[0]), acts


def readout(model, tokens, mask=None, interventions=(), positions: Sequence[int] | None = (-1,), *,
            start_layer: int = 0, resid=None) -> Readout:
    """Run the model (optionally resuming at `start_layer` from the `resid_pre` `resid`) and read the final
    residual and logits at the sequence indices `positions` only (`None`: all). Pure; jit it or call it
    inside a jitted function (unused full-sequence logits are then never computed)."""
    return readout_with(model, tokens, mask, interventions, positions, start_layer=start_layer, resid=resid)[0]


def _last(logits: Array) -> Array:
    return logits[:, -1]


class LogitDiff(eqx.Module):
    """Mean over the batch of `logit[correct] - logit[wrong]` at the last read position (`[B]` ids or scalars)."""

    correct: Int[Array, "*B"]
    wrong: Int[Array, "*B"]

    def __init__(self, correct, wrong):
        self.correct, self.wrong = jnp.asarray(correct, jnp.int32), jnp.asarray(wrong, jnp.int32)

    def __call__(self, r: Readout) -> Array:
        last = _last(r.logits)
        pick = lambda ids: jnp.take_along_axis(last, jnp.broadcast_to(ids, last.shape[:1])[:, None], -1)[:, 0]
        return jnp.mean(pick(self.correct) - pick(self.wrong))


class TokenLogProb(eqx.Module):
    """Mean over the batch of `log p(any of ids)` at the last read position (a refusal score with ids of
    "I", "Sorry", ...)."""

    ids: Int[Array, "n"]

    def __init__(self, ids):
        self.ids = jnp.atleast_1d(jnp.asarray(ids, jnp.int32))

    def __call__(self, r: Readout) -> Array:
        logp = jax.nn.log_softmax(_last(r.logits), -1)
        return jnp.mean(jax.nn.logsumexp(logp[:, self.ids], -1))


class NextTokenLoss(eqx.Module):
    """Mean next-token cross-entropy over real tokens; read every position (`positions=None`)."""

    tokens: Int[Array, "B T"]
    mask: Int[Array, "B T"]

    def __init__(self, tokens, mask=None):
        self.tokens = jnp.asarray(tokens, jnp.int32)
        self.mask = jnp.ones_like(self.tokens) if mask is None else jnp.asarray(mask, jnp.int32)

    def __call__(self, r: Readout) -> Array:
        logp = jax.nn.log_softmax(r.logits[:, :-1], -1)
        nll = -jnp.take_along_axis(logp, self.tokens[:, 1:, None], -1)[..., 0]
        w = (self.mask[:, 1:] * self.mask[:, :-1]).astype(jnp.float32)
        return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


class Projection(eqx.Module):
    """Mean over the batch of the final residual's component along `direction` at the last read position."""

    direction: Float[Array, "D"]

    def __call__(self, r: Readout) -> Array:
        d = self.direction / jnp.linalg.norm(self.direction)
        return jnp.mean(r.resid[:, -1] @ d)
