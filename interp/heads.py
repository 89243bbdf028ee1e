"""Attention-head diagnostics: induction, previous-token and first-token (sink) scores, pattern grids, and
`HeadGrid`, a labelled `[layers, heads]` result (`top`, `table`, `plot`, a short repr) for any per-head score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

import models
from interp.grids import LayerGrid


def repeated_random_tokens(key: jax.Array, batch: int, half: int, vocab: int, bos: int | None,
                           low: int = 1000) -> Int[Array, "B T"]:
    """`[bos] + r + r` with `r` uniform over token ids `[low, vocab)`: induction heads predict the second half."""
    r = jax.random.randint(key, (batch, half), low, vocab, dtype=jnp.int32)
    rows = [r, r] if bos is None else [jnp.full((batch, 1), bos, jnp.int32), r, r]
    return jnp.concatenate(rows, axis=1)


def _diagonal_score(pattern: Float[Array, "L B H T S"], offset: int, queries: slice) -> Float[Array, "L H"]:
    """Mean attention from each query q (in `queries`) to key q - offset."""
    T = pattern.shape[-2]
    q = jnp.arange(T)[queries]
    return pattern[..., q, q - offset].mean(axis=(1, 3))


def induction_scores(pattern: Float[Array, "L B H T T"], half: int, prefix: int = 1) -> Float[Array, "L H"]:
    """Attention from each second-half token to the token after its first occurrence (`prefix` BOS tokens)."""
    return _diagonal_score(pattern, half - 1, slice(prefix + half, None))


def previous_token_scores(pattern: Float[Array, "L B H T T"]) -> Float[Array, "L H"]:
    """Attention to the previous token, averaged over queries: `[L, H]` from patterns `[L, B, H, T, T]`."""
    return _diagonal_score(pattern, 1, slice(1, None))


def first_token_scores(pattern: Float[Array, "L B H T T"], mask: Int[Array, "B T"] | None = None) -> Float[Array, "L H"]:
    """Attention to each row's first real token (the 'attention sink'), averaged over later queries."""
    if mask is None:
        return pattern[..., 1:, 0].mean(axis=(1, 3))
    first = jnp.argmax(jnp.asarray(mask) > 0, axis=1)  # [B]
    to_first = jnp.take_along_axis(pattern, first[None, :, None, None, None], axis=-1)[..., 0]  # [L B H T]
    later = (jnp.arange(pattern.shape[-2])[None, :] > first[:, None]) & (jnp.asarray(mask) > 0)  # [B T]
    w = later[None, :, None, :]
    return (to_first * w).sum(axis=(1, 3)) / w.sum(axis=(1, 3))


def head_pattern_scores(m: models.Model, tokens, mask=None) -> dict[str, Float[Array, "L H"]]:
    """Previous-token and first-token scores of every head on `tokens` (one forward)."""
    _, acts = models.forward(m, tokens, attention_mask=mask, capture=("attn.pattern",))
    p = acts["attn.pattern"]
    return {"previous_token": previous_token_scores(p), "first_token": first_token_scores(p, mask)}


def plot_patterns(pattern: Float[Array, "L B H T T"], heads: Sequence[tuple[int, int]], labels: Sequence[str],
                  row: int = 0, cols: int = 3, size: float = 3.2):
    """A grid of attention patterns for `(layer, head)` pairs with token labels on both axes."""
    import matplotlib.pyplot as plt

    rows = -(-len(heads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax, (layer, head) in zip(axes.flat, heads):
        ax.imshow(np.asarray(pattern[layer, row, head]), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"L{layer}H{head}", fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set_xlabel("key", fontsize=7)
        ax.set_ylabel("query", fontsize=7)
    for ax in list(axes.flat)[len(heads):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


@dataclass(frozen=True, eq=False, repr=False)  # the one-line repr of LayerGrid
class HeadGrid(LayerGrid):
    """A `[layers, heads]` score with its name (`"mean ablation of TokenLogProb"`), an `interp.grids.LayerGrid`:
    `np.asarray(grid)`, `grid.shape` and `grid[l, h]` read the values (so plots and statistics take it as the
    array); `top(k)` names the `k` heads of largest |value| (`L3H1`), `table(k)` is a markdown table of them,
    `plot()` a labelled heatmap, and `repr` one line with the largest."""

    first_layer: int = 0  # the layer of row 0 (a sweep over later layers only)

    column = "head"
    _title = "HeadGrid"

    def row_labels(self) -> list[str]:
        return [str(self.first_layer + i) for i in range(self.shape[0])]

    def cell_label(self, i: int, j: int) -> str:
        return f"L{self.first_layer + i}H{j}"
