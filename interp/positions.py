"""Position selectors: which sequence indices of a padded batch to read or edit.

A selector is called as `selector(tokens, mask, tokenizer=None) -> Int[Array, "B P"]`: for every row, `P`
indices into the sequence axis, valid for left- (or right-) padded batches as `models.Model.tokenize` makes
them. Use the result with `gather` (a `jnp.take_along_axis` that knows where the batch and sequence axes
are) or turn it into a `[B, T]` mask with `to_mask`.

    idx = PostInstruction()(tokens, mask, model)       # [B, n_post]: "<|im_end|>\\n<|im_start|>assistant\\n"
    acts = gather(resid_pre, idx, seq_axis=2)          # [L, B, T, D] -> [L, B, n_post, D]

Chat-template positions are derived from the model's own template (`post_instruction_ids`), never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from models.errors import InputError

__all__ = [
    "Absolute", "AllTokens", "FromEnd", "LastInstruction", "PostInstruction", "Selector",
    "gather", "labels", "post_instruction_ids", "to_mask",
]

_PLACEHOLDER = "Zq7Placeholder"


@runtime_checkable
class Selector(Protocol):
    """A position selector: `(tokens [B, T], mask [B, T], tokenizer) -> [B, P]` sequence indices per row."""
    def __call__(self, tokens, mask, tokenizer=None) -> Int[Array, "B P"]: ...


def _bounds(mask) -> tuple[Array, Array]:
    """Index of each row's first real token and its number of real tokens (real tokens are contiguous)."""
    mask = jnp.asarray(mask)
    return jnp.argmax(mask > 0, axis=1).astype(jnp.int32), jnp.sum(mask > 0, axis=1).astype(jnp.int32)


def _real_index(mask, offsets) -> Int[Array, "B P"]:
    """Sequence index of the `offsets`-th real token of each row (negative offsets count from the end)."""
    first, n = _bounds(mask)
    off = jnp.asarray(offsets, jnp.int32)[None, :]
    return first[:, None] + jnp.where(off < 0, n[:, None] + off, off)


@dataclass(frozen=True)
class Absolute:
    """The i-th real token of each row (0 = first real token, -1 = last), for each i in `indices`."""

    indices: tuple[int, ...]

    def __init__(self, *indices: int):
        object.__setattr__(self, "indices", tuple(int(i) for i in indices))

    def __call__(self, tokens, mask, tokenizer=None):
        return _real_index(mask, self.indices)


@dataclass(frozen=True)
class FromEnd:
    """The token at offset `k` from the end of each row's real tokens, for each k in `offsets`: `-1` is the last
    real token, `-2` the one before, as in every other API (`positions=(-1,)`, `Capture(positions=)`,
    `Where(positions=)`, `Absolute(-1)`). `FromEnd(k)` picks what `Absolute(k)` picks; it differs only in
    accepting nothing but offsets `<= -1`, so a position meant to count from the end cannot count from the start.

    Offsets `>= 0` are an `InputError`: an earlier version counted `FromEnd(0)` as the last token, and such code
    now fails loudly (the message gives the translation `FromEnd(-1 - k)`) instead of shifting by one."""

    offsets: tuple[int, ...]

    def __init__(self, *offsets: int):
        if not offsets:
            raise InputError("FromEnd needs at least one offset (-1 = the last token, -2 the one before)")
        if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) for k in offsets):
            raise InputError(f"FromEnd offsets must be ints <= -1 (-1 = the last token), got {offsets}")
        if any(k >= 0 for k in offsets):
            hint = ("" if any(k < 0 for k in offsets) else
                    f"; if this was written for the old count (FromEnd(0) = the last token) it is now "
                    f"FromEnd({', '.join(str(-1 - k) for k in offsets)})")
            raise InputError(f"FromEnd offsets must be <= -1: they count from the end as positions=(-1,) does "
                             f"(FromEnd(-1) is the last token, FromEnd(-2) the one before), got {offsets}{hint}")
        object.__setattr__(self, "offsets", tuple(int(k) for k in offsets))

    def __call__(self, tokens, mask, tokenizer=None):
        return _real_index(mask, self.offsets)


@dataclass(frozen=True)
class AllTokens:
    """Every sequence index `0..T-1` (padding included: weight by `gather(mask, idx)`)."""

    def __call__(self, tokens, mask, tokenizer=None):
        B, T = jnp.shape(tokens)
        return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def _tokenizer(obj):
    """A `models.Model` or a `Tokenizer` -> the tokenizer."""
    tok = getattr(obj, "tokenizer", obj)
    if tok is None or not hasattr(tok, "apply_chat_template"):
        raise InputError("this selector needs the model (or its tokenizer) with a chat template")
    return tok


@lru_cache(maxsize=32)
def _post_instruction_ids(tok) -> tuple[int, ...]:
    text = tok.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], add_generation_prompt=True)
    if text.count(_PLACEHOLDER) != 1:
        raise InputError("cannot locate the user message in the chat template")
    suffix = tok.encode(text.split(_PLACEHOLDER, 1)[1], add_bos=False)
    full = tok.encode(text)
    if suffix and full[-len(suffix):] == suffix:
        return tuple(suffix)
    # BPE merged across the message boundary: keep the token suffix shared by two different messages.
    other = tok.encode(tok.apply_chat_template([{"role": "user", "content": "other words!"}], add_generation_prompt=True))
    n = 0
    while n < min(len(full), len(other)) and full[-1 - n] == other[-1 - n]:
        n += 1
    return tuple(full[len(full) - n:])


def post_instruction_ids(model_or_tokenizer) -> tuple[int, ...]:
    """Token ids the chat template puts after a user message (end of turn + the assistant header)."""
    return _post_instruction_ids(_tokenizer(model_or_tokenizer))


def _check_suffix(tokens, mask, ids: tuple[int, ...]) -> None:
    """On concrete inputs, check every row ends with the template's post-instruction tokens."""
    try:
        tokens, mask = np.asarray(tokens), np.asarray(mask)
    except jax.errors.TracerArrayConversionError:
        return  # traced inside jit: nothing concrete to check
    first, n = (np.asarray(a) for a in _bounds(mask))
    want = np.asarray(ids)
    for b in range(tokens.shape[0]):
        row = tokens[b, first[b]:first[b] + n[b]]
        if len(row) <= len(want) or not np.array_equal(row[-len(want):], want):
            raise InputError(f"row {b} does not end with the chat template's post-instruction tokens {list(ids)}; "
                             "format prompts with model.apply_chat_template(..., add_generation_prompt=True)")


@dataclass(frozen=True)
class PostInstruction:
    """The template tokens after the user's instruction, `[B, n_post]` (e.g. `<|im_end|>\\n<|im_start|>assistant\\n`)."""

    check: bool = True

    def __call__(self, tokens, mask, tokenizer=None):
        ids = post_instruction_ids(tokenizer)
        if self.check:
            _check_suffix(tokens, mask, ids)
        return _real_index(mask, tuple(range(-len(ids), 0)))


@dataclass(frozen=True)
class LastInstruction:
    """The last token of the user's instruction (the one before the post-instruction tokens), `[B, 1]`."""

    check: bool = True

    def __call__(self, tokens, mask, tokenizer=None):
        ids = post_instruction_ids(tokenizer)
        if self.check:
            _check_suffix(tokens, mask, ids)
        return _real_index(mask, (-len(ids) - 1,))


def gather(x: Array, idx: Int[Array, "B P"], seq_axis: int = 1) -> Array:
    """Select `idx` along `seq_axis` of `x`, whose batch axis is `seq_axis - 1`: `[..., B, T, ...] -> [..., B, P, ...]`."""
    x = jnp.asarray(x)
    seq_axis = seq_axis % x.ndim
    idx = jnp.asarray(idx).reshape((1,) * (seq_axis - 1) + idx.shape + (1,) * (x.ndim - seq_axis - 1))
    return jnp.take_along_axis(x, idx, axis=seq_axis)


def to_mask(idx: Int[Array, "B P"], seq_len: int) -> Array:
    """`[B, T]` boolean mask, true at the selected indices."""
    return jnp.any(jnp.asarray(idx)[:, :, None] == jnp.arange(seq_len)[None, None, :], axis=1)


def labels(selector, n: int) -> list[str]:
    """Names of the `n` positions `selector` gives, with its arguments: `Absolute(0)`, `FromEnd(-2)` (one per
    index or offset), `LastInstruction`, `PostInstruction[2]` (its third position)."""
    args = {Absolute: "indices", FromEnd: "offsets"}.get(type(selector))
    args = getattr(selector, args) if args else None
    name = getattr(selector, "__name__", type(selector).__name__)
    if args is not None and len(args) == n:
        return [f"{name}({a})" for a in args]
    return [name] if n == 1 else [f"{name}[{i}]" for i in range(n)]
