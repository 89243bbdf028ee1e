"""Labelled `[layers, columns]` results, shared by head sweeps (`interp.heads.HeadGrid`, a column per head) and
activation patching (`interp.sweeps.PatchGrid`, a column per position or head).

`LayerGrid` holds the values with their labels: `np.asarray(g)`, `g.shape` and `g[l, c]` read the values,
`top(k)` names the `k` cells of largest |value| (`L3H1`, `L3 @5 ' Paris'`), `table(k)` is a markdown table of
them, `plot()` a heatmap with the labels on its axes, and `repr` one line with the largest cells.
`ArrayResult` makes such a grid also compute as its float64 array (operators, ufuncs, ndarray methods), so
code written for the bare array keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

from models.errors import InputError

__all__ = ["ArrayResult", "LayerGrid"]


@dataclass(frozen=True, eq=False)
class LayerGrid:
    """A `[layers, columns]` float64 score with its `name`. Subclasses say what a column is (`column`, the
    row and column tick labels, a cell's label); this base numbers both axes from 0."""

    values: np.ndarray
    name: str = ""

    column = "column"  # what one column is: "head", "position" (table header, x-axis label, repr)
    _title = "LayerGrid"  # the class name the one-line repr shows

    def __post_init__(self):
        v = np.asarray(self.values, np.float64)
        if v.ndim != 2:
            raise InputError(f"{self._title} values are [layers, {self.column}s], got shape {v.shape}")
        object.__setattr__(self, "values", v)

    # --- labels (overridden by subclasses)
    def row_labels(self) -> list[str]:
        """The layer of each row, as text."""
        return [str(i) for i in range(self.shape[0])]

    def column_labels(self) -> list[str]:
        """Each column's tick label."""
        return [str(j) for j in range(self.shape[1])]

    def cell_label(self, i: int, j: int) -> str:
        """The name of cell `(i, j)` (row `i`, column `j`)."""
        return f"L{self.row_labels()[i]} {self.column_labels()[j]}"

    # --- the array
    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)

    def __getitem__(self, index):
        return self.values[index]

    # --- reading
    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """`(label, value)` of the `k` cells with the largest |value|, largest first (NaN cells last)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"{self._title}.top k must be an int >= 1, got {k!r}")
        flat = np.argsort(-np.abs(np.nan_to_num(self.values, nan=0.0)), axis=None, kind="stable")[:k]
        C = self.shape[1]
        return [(self.cell_label(int(i) // C, int(i) % C), float(self.values.flat[i])) for i in flat]

    def table(self, k: int = 10) -> str:
        """A markdown table of `top(k)`: `| <column kind> | <name> |`."""
        rows = [f"| {label} | {v:+.4g} |" for label, v in self.top(k)]
        return "\n".join([f"| {self.column} | {self.name or 'value'} |", "|---|---:|"] + rows)

    def plot(self, path: str | None = None, **kwargs):
        """A heatmap with the layer and column labels on its axes (`interp.plot.heatmap`; keywords go to it)."""
        from interp.plot import heatmap

        return heatmap(self.values, title=kwargs.pop("title", self.name), xlabel=kwargs.pop("xlabel", self.column),
                       yticks=kwargs.pop("yticks", self.row_labels()),
                       xticks=kwargs.pop("xticks", self.column_labels()), path=path, **kwargs)

    heatmap = plot

    def __repr__(self) -> str:
        L, C = self.shape
        best = ", ".join(f"{label} {v:+.3g}" for label, v in self.top(3))
        return f"{self._title}({self.name!r}, {L} layers x {C} {self.column}s; largest |value|: {best})"


class ArrayResult(NDArrayOperatorsMixin):
    """Mixed into a `LayerGrid` subclass, makes it compute as its float64 array: operators and ufuncs give numpy
    arrays (`a - b`, `np.abs(a)`), and ndarray methods and attributes (`ravel`, `tolist`, `max`, `dtype`, ...)
    are the array's."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(x.values if isinstance(x, LayerGrid) else x for x in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __getattr__(self, name):  # only for names the grid lacks: the ndarray's methods and attributes
        if name.startswith("__") or name == "values":
            raise AttributeError(name)
        return getattr(self.values, name)

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self):
        return iter(self.values)
