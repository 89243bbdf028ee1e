"""Figures without a display: a `matplotlib.figure.Figure` (Agg canvas) that callers save or show.

    fig = Figure(figsize=(6, 4)); ax = fig.add_subplot(); ...
    save_figure(fig, out / "plot.png")             # the one way every study and report saves a figure

A bare Agg figure, never pyplot: `matplotlib.use("Agg")` would switch a notebook's inline backend off."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["heatmap", "save_figure"]


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Save `fig` to `path` with an Agg canvas (no display needed) after `tight_layout`; returns the path."""
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return Path(path)


def heatmap(values, *, title: str = "", xlabel: str = "head", ylabel: str = "layer",
            xticks: Sequence[str] | None = None, yticks: Sequence[str] | None = None, cmap: str = "RdBu_r",
            center: float | None = 0.0, colorbar_label: str = "", path: str | None = None) -> Figure:
    """A `[rows, cols]` heatmap (rows = layers by default), diverging around `center`; saved to `path` if given."""
    v = np.asarray(values, np.float64)
    if v.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D array, got shape {v.shape}")
    rows, cols = v.shape
    fig = Figure(figsize=(max(4.0, 0.35 * cols + 2), max(3.0, 0.22 * rows + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    kw = {}
    if center is not None:
        span = float(np.nanmax(np.abs(v - center))) or 1.0
        kw = dict(vmin=center - span, vmax=center + span)
    im = ax.imshow(v, cmap=cmap, aspect="auto", interpolation="nearest", origin="upper", **kw)
    fig.colorbar(im, ax=ax, label=colorbar_label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if xticks is not None:
        ax.set_xticks(range(cols), labels=list(xticks), rotation=90)
    if yticks is not None:
        ax.set_yticks(range(rows), labels=list(yticks))
    if path is not None:
        save_figure(fig, path, dpi=120)
    else:
        fig.tight_layout()
    return fig
