"""What a metric sees: the final residual and the logits at chosen positions, and ready-made metrics.

A metric is any function `metric(Readout) -> scalar` (averaged over the batch). Metrics defined here are
equinox modules, so their arrays (target token ids, a direction) are traced, not baked into the program:
sweeps with a new metric of the same kind reuse the compiled code.

    r = run_readout(model, tokens, mask)           # Readout(logits [B, 1, V], resid [B, 1, D]) at the last position
    LogitDiff(correct_ids, wrong_ids)(r)       # mean over the batch of logit[correct] - logit[wrong]
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

import models
from models import transformer
from models.checks import check_tokens
from models.errors import InputError
from models.model import as_captures
from models.transformer import Capture

__all__ = [
    "ContinuationLoss", "LogitDiff", "NextTokenLoss", "Projection", "Readout", "TokenLogProb", "as_positions",
    "as_target", "check_metric", "logits_from_resid", "metric_positions", "readout_with", "run_readout",
]


class Readout(NamedTuple):
    """What a metric reads at the selected positions: final `logits [B, P, V]` and the last `resid [B, P, D]`."""
    logits: Float[Array, "B P V"]  # float32, after the final norm, unembedding and soft-cap
    resid: Float[Array, "B P D"]  # residual stream leaving the last layer (before the final norm)


def as_positions(positions: Sequence[int] | None) -> tuple[int, ...] | None:
    """Read positions as a static tuple (`None` kept: every sequence index). A position is the `p`-th real
    token of each row (0 = first, -1 = last), as everywhere in the library (`models.checks`)."""
    if positions is None:
        return None
    if isinstance(positions, (int, np.integer)):
        positions = (positions,)
    return tuple(int(p) for p in positions)


def metric_positions(metric, positions="metric") -> tuple[int, ...] | None:
    """The positions a sweep reads for `metric`: `positions` as given, or with the default `"metric"` the
    metric's own `positions` attribute (`NextTokenLoss`: every position), else the last token `(-1,)`."""
    if isinstance(positions, str):
        if positions != "metric":
            raise InputError(f"positions must be a sequence of ints, None (every position) or 'metric', got {positions!r}")
        positions = getattr(metric, "positions", (-1,))
    return as_positions(positions)


def check_metric(metric, cfg, batch: int) -> None:
    """The metric's own checks against the model (token ids in the vocabulary, per-row ids matching the batch)."""
    validate = getattr(metric, "validate", None)
    if validate is not None:
        validate(cfg, batch)


def logits_from_resid(params, cfg, resid: Float[Array, "... D"]) -> Float[Array, "... V"]:
    """The final norm, unembedding and soft-cap applied to any residual (the logit lens)."""
    shape = resid.shape
    flat = resid.reshape(1, -1, shape[-1])
    logits = transformer.unembed(params, transformer.norm(flat, params["ln_final"], cfg), cfg)
    return logits.reshape(*shape[:-1], -1)


def readout_with(model, tokens, mask=None, interventions=(), positions: Sequence[int] | None = (-1,), capture=(), *,
                 start_layer: int = 0, resid=None) -> tuple[Readout, dict]:
    """`run_readout` plus the activations named in `capture` (as `models.forward` returns them)."""
    cfg = model.cfg
    pos = as_positions(positions)
    final = (Capture("resid_post", layers=(cfg.n_layers - 1,), positions=pos), Capture("final_norm", positions=pos))
    extra = as_captures(capture)
    if any(c.site in ("resid_post", "final_norm") for c in extra):
        raise InputError("readout_with captures resid_post/final_norm itself; capture them with models.forward")
    _, acts = models.forward(model, tokens, mask, None, final + extra, tuple(interventions), start_layer=start_layer,
                             resid=resid)
    logits = transformer.unembed(model.params, acts.pop("final_norm"), cfg)
    return Readout(logits, acts.pop("resid_post")[0]), acts


def run_readout(model, tokens, mask=None, interventions=(), positions: Sequence[int] | None = (-1,), *,
            start_layer: int = 0, resid=None) -> Readout:
    """Run the model (optionally resuming at `start_layer` from the `resid_pre` `resid`) and read the final
    residual and logits at `positions` only: the `p`-th real token of each row (-1 = each row's last, for any
    padding; `None`: every sequence index). Pure; jit it or call it inside a jitted function (unused
    full-sequence logits are then never computed). Out-of-range positions raise InputError."""
    return readout_with(model, tokens, mask, interventions, positions, start_layer=start_layer, resid=resid)[0]


def _last(logits: Array) -> Array:
    return logits[:, -1]


def as_target(ids, name: str) -> Array:
    """One token id (an int, a 0-d array, or a one-element list as `encode` returns) or an explicit per-row
    integer array `[B]`; a list of several ids is an InputError naming `name`."""
    if isinstance(ids, (list, tuple)):
        if len(ids) != 1:
            raise InputError(f"{name}={list(ids)!r} is a list of {len(ids)} token ids, but a target is one id: a word "
                             "that tokenizes to several tokens, or an encode() that put BOS first, would read the "
                             "wrong token. Pass model.to_single_token(' word'), or an explicit per-row "
                             "np.array([...]) of shape [batch]")
        ids = ids[0]
    a = jnp.asarray(ids)
    if a.ndim > 1 or (a.size and not jnp.issubdtype(a.dtype, jnp.integer)):
        raise InputError(f"{name} must be one integer token id or a per-row integer array [batch], got shape "
                         f"{a.shape} dtype {a.dtype}")
    return a.astype(jnp.int32)


def _check_targets(name: str, ids, vocab: int, batch: int | None) -> None:
    """Ids in the vocabulary (when concrete) and a per-row `[B]` array matching the batch."""
    check_tokens(ids, vocab, name)
    if batch is not None and np.ndim(ids) == 1 and np.shape(ids)[0] != batch:
        raise InputError(f"{name} holds {np.shape(ids)[0]} per-row ids but the batch has {batch} rows")


def _pick(last: Float[Array, "B V"], ids, name: str) -> Float[Array, " B"]:
    """`last[b, ids]` (or `last[b, ids[b]]` for per-row ids); an id outside the vocabulary, traced, reads NaN."""
    _check_targets(name, ids, last.shape[-1], last.shape[0])
    return jnp.take_along_axis(last, jnp.broadcast_to(ids, last.shape[:1])[:, None], -1, mode="fill",
                               fill_value=jnp.nan)[:, 0]


class LogitDiff(eqx.Module):
    """Mean over the batch of `logit[correct] - logit[wrong]` at the last read position. Each target is one token
    id (`model.to_single_token(" Paris")`) or an explicit per-row array `[B]`; a list of several ids raises."""

    correct: Int[Array, "*B"]
    wrong: Int[Array, "*B"]

    def __init__(self, correct, wrong):
        self.correct, self.wrong = as_target(correct, "LogitDiff correct"), as_target(wrong, "LogitDiff wrong")

    def validate(self, cfg, batch: int | None = None) -> None:
        _check_targets("LogitDiff correct", self.correct, cfg.vocab_size, batch)
        _check_targets("LogitDiff wrong", self.wrong, cfg.vocab_size, batch)

    def __call__(self, r: Readout) -> Array:
        last = _last(r.logits)
        return jnp.mean(_pick(last, self.correct, "LogitDiff correct") - _pick(last, self.wrong, "LogitDiff wrong"))


class TokenLogProb(eqx.Module):
    """Mean over the batch of `log p(ids)` at the last read position: one token id or a per-row array `[B]`
    (a list of several ids raises), or with `any_of=True` a set of alternatives `[n]`, `log p(any of ids)`
    (a refusal score with the ids of "I", "Sorry", ...)."""

    ids: Int[Array, "*n"]
    any_of: bool = eqx.field(static=True)

    def __init__(self, ids, *, any_of: bool = False):
        self.any_of = any_of
        if any_of:
            self.ids = jnp.atleast_1d(jnp.asarray(ids, jnp.int32))
            if self.ids.ndim != 1:
                raise InputError(f"TokenLogProb ids with any_of=True is a set of alternatives [n], got shape "
                                 f"{self.ids.shape}")
        else:
            self.ids = as_target(ids, "TokenLogProb ids")

    def validate(self, cfg, batch: int | None = None) -> None:
        _check_targets("TokenLogProb ids", self.ids, cfg.vocab_size, None if self.any_of else batch)

    def __call__(self, r: Readout) -> Array:
        logp = jax.nn.log_softmax(_last(r.logits), -1)
        if not self.any_of:
            return jnp.mean(_pick(logp, self.ids, "TokenLogProb ids"))
        check_tokens(self.ids, logp.shape[-1], "TokenLogProb ids")
        return jnp.mean(jax.nn.logsumexp(jnp.take(logp, self.ids, axis=1, mode="fill", fill_value=jnp.nan), -1))


class NextTokenLoss(eqx.Module):
    """Mean next-token cross-entropy over real tokens. It reads every position: the sweeps and `baseline` do
    so by default (its `positions` is `None`); with `run_readout` pass `positions=None`."""

    tokens: Int[Array, "B T"]
    mask: Int[Array, "B T"]
    positions = None  # what the sweeps read for this metric by default: every position

    def __init__(self, tokens, mask=None):
        self.tokens = jnp.asarray(tokens, jnp.int32)
        self.mask = jnp.ones_like(self.tokens) if mask is None else jnp.asarray(mask, jnp.int32)

    def validate(self, cfg, batch: int | None = None) -> None:
        check_tokens(self.tokens, cfg.vocab_size, "NextTokenLoss tokens")

    def __call__(self, r: Readout) -> Array:
        if r.logits.shape[:2] != self.tokens.shape:
            raise InputError(f"NextTokenLoss needs the logits at every position {self.tokens.shape}, got "
                             f"{r.logits.shape[:2]}: read with positions=None (the sweeps' default positions='metric' "
                             "does)")
        logp = jax.nn.log_softmax(r.logits[:, :-1], -1)
        nll = -jnp.take_along_axis(logp, self.tokens[:, 1:, None], -1)[..., 0]
        w = (self.mask[:, 1:] * self.mask[:, :-1]).astype(jnp.float32)
        return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


class ContinuationLoss(eqx.Module):
    """Mean next-token cross-entropy of each row's last `n` real tokens (`targets [B, n]`), the tokens with
    weight 1 in `weights [B, n]` (a row's shorter continuation: its first weights 0), averaged over every
    counted token. For continuations appended to left-padded prompts: it reads the `n` positions before them
    (`positions = (-n - 1, ..., -2)`), so only those are unembedded. `of(tokens, lengths)` builds it."""

    targets: Int[Array, "B n"]
    weights: Float[Array, "B n"]
    positions: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, targets, weights=None):
        self.targets = jnp.asarray(targets, jnp.int32)
        if self.targets.ndim != 2 or self.targets.shape[1] < 1:
            raise InputError(f"ContinuationLoss targets are [batch, n >= 1], got shape {self.targets.shape}")
        self.weights = jnp.ones(self.targets.shape, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
        if self.weights.shape != self.targets.shape:
            raise InputError(f"ContinuationLoss weights {self.weights.shape} != targets {self.targets.shape}")
        self.positions = tuple(range(-self.targets.shape[1] - 1, -1))

    @classmethod
    def of(cls, tokens, lengths) -> "ContinuationLoss":
        """For left-padded `tokens [B, T]` whose row b ends in a continuation of `lengths[b]` tokens."""
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        n = max(1, int(lengths.max()))
        if n >= tokens.shape[1]:
            raise InputError(f"ContinuationLoss: a continuation of {n} tokens leaves no context in rows of "
                             f"{tokens.shape[1]}")
        return cls(tokens[:, -n:], np.arange(n)[None] >= n - lengths[:, None])

    def validate(self, cfg, batch: int | None = None) -> None:
        check_tokens(self.targets, cfg.vocab_size, "ContinuationLoss targets")
        if batch is not None and self.targets.shape[0] != batch:
            raise InputError(f"ContinuationLoss targets have {self.targets.shape[0]} rows, the batch {batch}")

    def __call__(self, r: Readout) -> Array:
        logp = jax.nn.log_softmax(r.logits, -1)
        nll = -jnp.take_along_axis(logp, self.targets[..., None], -1)[..., 0]
        return jnp.sum(nll * self.weights) / jnp.maximum(jnp.sum(self.weights), 1.0)


class Projection(eqx.Module):
    """Mean over the batch of the final residual's component along `direction` at the last read position."""

    direction: Float[Array, " D"]

    def __call__(self, r: Readout) -> Array:
        d = self.direction / jnp.linalg.norm(self.direction)
        return jnp.mean(r.resid[:, -1] @ d)
