"""The end-of-run report: `report.json` (final metrics per hook) and `training_curves.png`."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_curves", "summarise", "write"]

CURVES = (("explained_variance", "explained variance"), ("l0", "L0"), ("dead_frac", "dead fraction"),
          ("dense_frac", "dense fraction"), ("loss", "loss"))


def summarise(history: list[dict], final_eval: dict | None = None) -> dict:
    """Final training metrics (mean of the last logged window) and the last evaluation, per hook."""
    train = [r for r in history if "eval" not in r]
    evals = [r for r in history if "eval" in r]
    out: dict = {"steps": train[-1]["step"] if train else 0, "tokens": train[-1]["tokens"] if train else 0,
                 "tokens_per_s": train[-1]["tokens_per_s"] if train else None, "hooks": {}}
    if train:
        for h, v in train[-1].items():
            if isinstance(v, dict):
                out["hooks"][h] = dict(v)
    last_eval = final_eval or (evals[-1]["eval"] if evals else {})
    for h, v in last_eval.items():
        out["hooks"].setdefault(h, {}).update(v)
    return out


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Training curves (MSE, L0, dead fraction, CE recovered at evaluations) from `metrics.jsonl` rows, to `path`."""
    # a bare Agg figure, not pyplot: `matplotlib.use("Agg")` would switch a notebook's inline backend off
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in history if "eval" not in r]
    evals = [r for r in history if "eval" in r]
    hooks = sorted({h for r in train for h, v in r.items() if isinstance(v, dict)})
    fig = Figure(figsize=(13, 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    for ax, (key, label) in zip(axes.flat, CURVES):
        for h in hooks:
            xs = [r["tokens"] for r in train if h in r]
            ax.plot(xs, [r[h][key] for r in train if h in r], label=h)
        ax.set_title(label)
        ax.set_xlabel("tokens")
        if key == "loss":
            ax.set_yscale("log")
    ax = axes.flat[5]
    for h in hooks:
        pts = [(r["step"], r["eval"][h]["ce_recovered"]) for r in evals if h in r["eval"]]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=h)
    ax.set_title("CE loss recovered")
    ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def write(out: str | Path, cfg, history: list[dict], final_eval: dict | None = None) -> dict:
    """Write `report.json` and `training_curves.png` into `out`; returns the summary."""
    out = Path(out)
    summary = summarise(history, final_eval)
    summary["config"] = cfg.to_json() if hasattr(cfg, "to_json") else cfg
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    title = f"{cfg.arch} width {cfg.width} on {cfg.model}" if hasattr(cfg, "arch") else ""
    plot_curves(history, out / "training_curves.png", title)
    return summary
