"""Bounds checks of every concrete index a caller gives: layers, positions, heads, token ids, features.

One place for the whole library: `models.forward`, `models.generate`, the `interp` readouts, lenses and sweeps
call `check_call` (and interventions their `validate`) on concrete values before anything is traced, and each
failure is an `InputError` naming the argument, its value and the valid range. Shapes and static selections
are checked at trace time too; only values that are traced inside a caller's own `jit` cannot be, and there
the failure is a documented NaN fill, never a clamped neighbour: a token id outside the vocabulary embeds as
NaN, a position beyond a row's real tokens captures NaN (`real_index`).

Positions (one meaning in every public API): position `p` is the `p`-th real token of each row (0 = the first
real token, -1 = the last), whatever the padding; `Capture(seq_indices=)` and `Where(tokens=)` index the
sequence axis instead and `Where(position_ids=)` matches the position ids.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from models.errors import InputError
from models.sites import DENSE_ONLY, model_sites


def concrete(x) -> np.ndarray | None:
    """`x` as a numpy array, or `None` when it is traced (inside `jit`/`vmap`/`grad`)."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def show_values(values) -> str:
    """A short tuple-like rendering of `values` for error messages (at most 12 shown)."""
    v = np.asarray(values).ravel().tolist()
    return f"({v[0]},)" if len(v) == 1 else str(tuple(v)) if len(v) <= 12 else f"{tuple(v[:12])[:-1]}, ...)"


def check_index(name: str, values, n: int, what: str, *, negative: bool = False) -> None:
    """Every value in `[0, n)` (`[-n, n)` with `negative`), else an InputError naming `name`, the values and
    the range; `what` names the bound (e.g. "30 layers")."""
    v = concrete(values)
    if v is None or v.size == 0:
        return
    if not np.issubdtype(v.dtype, np.integer):
        raise InputError(f"{name}={show_values(v)} must be integers")
    lo = -n if negative else 0
    bad = v[(v < lo) | (v >= n)]
    if bad.size:
        valid = f"{lo}..{n - 1}" if n > 0 else "none"
        raise InputError(f"{name}={show_values(v)} out of range: {bad.ravel()[0]} is not a valid index for {what} "
                         f"(valid: {valid})")


def check_tokens(tokens, vocab_size: int, name: str = "tokens") -> None:
    """Integer token ids in `[0, vocab_size)`: the dtype is checked always (traced too), the values only when
    concrete (traced ids outside embed as NaN)."""
    dt = getattr(tokens, "dtype", None)
    dt = np.asarray(tokens).dtype if dt is None else dt
    if not jnp.issubdtype(dt, jnp.integer):
        raise InputError(f"{name} must hold integer token ids, got dtype {dt} (e.g. tokens.astype(np.int32) if "
                         "the values are whole numbers)")
    t = concrete(tokens)
    if t is None or t.size == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(f"{name} holds token id {bad}, outside this model's vocabulary of {vocab_size} "
                         f"(valid: 0..{vocab_size - 1})")


def check_mask(mask, name: str = "attention_mask") -> None:
    """A concrete mask holds only 0/1 (bool, integer or float); a traced mask is skipped (the check must not
    break tracing). A mask holding 2 would silently change the logits."""
    m = concrete(mask)
    if m is None:
        return
    if m.dtype != np.bool_ and m.size:
        bad = m[~np.isin(m, (0, 1))]
        if bad.size:
            raise InputError(f"{name} must hold only 0 (padding) and 1 (real token); it holds {bad.ravel()[0]!r}")


def row_lengths(mask) -> np.ndarray | None:
    """Real tokens of each row of a concrete `[B, T]` mask (`None` when traced)."""
    m = concrete(mask)
    return None if m is None else (m > 0).sum(1)


def check_positions(name: str, positions, lengths: np.ndarray | None, seq_len: int) -> None:
    """Positions (`p`-th real token, negative from each row's last) that exist in every row: `-n <= p < n`
    with `n` the shortest row's real tokens (`seq_len` when the mask is traced or absent)."""
    p = concrete(positions)
    if p is None or p.size == 0:
        return
    n = seq_len if lengths is None or len(lengths) == 0 else int(np.min(lengths))
    if lengths is not None and n == 0:
        raise InputError(f"{name}={show_values(p)}: row {int(np.argmin(lengths))} has no real tokens (its mask is all 0)")
    row = "" if lengths is None else f" (the shortest row, {int(np.argmin(lengths))}, has {n} real tokens)"
    check_index(name, p, n, f"{n} tokens{row}; 0 = each row's first real token, -1 = its last", negative=True)


def real_index(mask: Int[Array, "B T"], positions: Sequence[int]) -> Int[Array, "B P"]:
    """Sequence index of the `positions`-th real token of each row (negative: from the row's last real token),
    for left- or right-padded rows (real tokens contiguous). A position a row does not have gives index `T`,
    out of bounds: gathers with `mode="fill"` then read NaN."""
    mask = jnp.asarray(mask) > 0
    T = mask.shape[1]
    first = jnp.argmax(mask, axis=1).astype(jnp.int32)[:, None]
    n = jnp.sum(mask, axis=1).astype(jnp.int32)[:, None]
    p = jnp.asarray(positions, jnp.int32).reshape(1, -1)
    off = jnp.where(p < 0, n + p, p)
    return jnp.where((off >= 0) & (off < n), first + off, T)


class Extent(NamedTuple):
    """What an intervention meets: the model, the prompt pass's length and real tokens per row (None when
    traced), how many tokens `models.generate` adds after it, and whether the arrays carry a sweep axis."""

    cfg: Any
    seq_len: int
    lengths: np.ndarray | None
    new_tokens: int = 0
    stacked: bool = False


def check_interventions(interventions: Sequence, extent: Extent) -> None:
    """Call each intervention's `validate(extent)` (interp's do; any object without one is taken as is)."""
    for iv in interventions:
        validate = getattr(iv, "validate", None)
        if validate is not None:
            validate(extent)


def check_call(cfg, tokens, mask=None, captures: Sequence = (), interventions: Sequence = (), *, start_layer: int = 0,
               stop_layer: int | None = None, new_tokens: int | None = None) -> None:
    """Check a forward's token ids, captures (layers in `[start_layer, stop_layer)`, positions in every row)
    and interventions against the model config. `new_tokens` (from `models.generate`) lets position
    selections reach generated tokens. Concrete values are checked; traced ones are skipped."""
    shape = np.shape(tokens)
    if len(shape) != 2:
        return  # forward names the shape error
    T = shape[1]
    stop = cfg.n_layers if stop_layer is None else stop_layer
    check_tokens(tokens, cfg.vocab_size)
    if mask is not None:
        check_mask(mask)
    lengths = row_lengths(mask) if mask is not None else np.full(shape[0], T)
    have = model_sites(cfg)
    for c in captures:
        site = getattr(c, "site", c)
        if site not in have:
            raise InputError(f"Capture({site!r}): a {cfg.arch} model has no such site "
                             f"({'dense MLP' if site in DENSE_ONLY else 'mixture-of-experts'} only); its sites: "
                             f"{', '.join(have)}")
        layers = getattr(c, "layers", None)
        if layers is not None:
            check_index(f"Capture({site!r}) layers", np.asarray(layers, np.int64), stop,
                        f"the {stop} layers this forward runs (the model has {cfg.n_layers})")
            low = [l for l in layers if l < start_layer]
            if low:
                raise InputError(f"Capture({site!r}) layers={tuple(layers)}: layer {low[0]} is not run by a forward "
                                 f"that starts at layer {start_layer} (valid: {start_layer}..{stop - 1})")
        if getattr(c, "positions", None) is not None:
            check_positions(f"Capture({site!r}) positions", np.asarray(c.positions), lengths, T)
        if getattr(c, "seq_indices", None) is not None:
            check_index(f"Capture({site!r}) seq_indices", np.asarray(c.seq_indices), T,
                        f"a sequence of {T} (negative: from the end)", negative=True)
    check_interventions(interventions, Extent(cfg, T, lengths, new_tokens or 0))
