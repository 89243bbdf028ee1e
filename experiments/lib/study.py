"""The study skeleton: every study is a `Config` and `study(model, cfg, out) -> Report`; `Study.main` does the rest.

    STUDY = Study("refusal_direction", "Refusal direction (Arditi et al. 2024)", Config, study, __doc__)

    def main(argv=None, cfg=None):          # python -m experiments.refusal_direction --n-train 64 ...
        return STUDY.main(argv, cfg)        # -> (run folder, metrics)

`main` parses and validates the flags (a bad one costs nothing), runs the study's `check(cfg)` (data that must
exist, flag combinations: before any model loads), creates a fresh run folder `OUT/<name>/<timestamp>/` (never
another run's), then per model (`cfg.model`, and `cfg.second_model` where the config has one) loads it, runs
`study` under a `timing.Clock` and appends the model's wall-time split (compile / generation / compute, the
phases the study marked with `timing.lap`, the machine's load) to its report. The second model's figures go into
a sub-folder. In a study whose config has a `second_model` field every section is headed by its model's name
and the metrics are `{model: metrics}`; otherwise they are the study's own. Writes `report.md` and `metrics.json`.

A new study is one file: its docstring (the CLI's help), a frozen `Config` dataclass (`model`, `out`, optionally
`second_model`), `study(m, cfg, out) -> Report`, `STUDY = Study(...)` and the two-line `main`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import models
from experiments.lib.timing import Clock, WallTime
from models import cli
from models.errors import InputError


def run_dir(name: str, root: str = "runs") -> Path:
    """A new, empty directory `root/name/<timestamp>` for one run, created exclusively: a run started in the same
    second as another gets `<timestamp>-2`, `-3`, ... (never another run's directory)."""
    parent = Path(root) / name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1, 10_000):
        path = parent / (stamp if i == 1 else f"{stamp}-{i}")
        try:
            path.mkdir()  # atomic: exactly one of two racing runs creates it
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: 9,999 run directories named {stamp}[-i] exist already")


def undefined_to_none(x):
    """`x` (nested dicts / lists / arrays of numbers) with NaN replaced by None, for strict JSON: an undefined
    quantity is written as null, never as 0."""
    if isinstance(x, dict):
        return {k: undefined_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.ndim > 0):
        return [undefined_to_none(v) for v in x]
    if isinstance(x, (float, np.floating)) or (isinstance(x, np.ndarray) and x.ndim == 0):
        return None if not np.isfinite(x) else float(x)
    return x


def write_report(path: Path, title: str, cfg, sections: Sequence[tuple[str, str]], metrics: dict) -> Path:
    """`report.md` (config, then one section per (heading, markdown body)) and `metrics.json` in `path`."""
    lines = [f"# {title}", "", "Config: `" + json.dumps(dataclasses.asdict(cfg)) + "`", ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", body.strip(), ""]
    (path / "report.md").write_text("\n".join(lines))
    (path / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return path / "report.md"


@dataclass
class Report:
    """What a study returns for one model: markdown `sections` `[(heading, body)]` in order and JSON-able
    `metrics`; `wall` is filled in by `Study.main` (the run's `timing.WallTime`)."""

    sections: list[tuple[str, str]]
    metrics: dict
    wall: WallTime | None = None

    def __post_init__(self):
        heads = [h for h, _ in self.sections]
        dup = sorted({h for h in heads if heads.count(h) > 1})
        if dup:
            raise ValueError(f"Report sections {dup} appear more than once: headings must be unique")

    def __getitem__(self, heading: str) -> str:
        """One section's body by heading."""
        for h, body in self.sections:
            if h == heading:
                return body
        raise KeyError(f"no section {heading!r}; the sections are {[h for h, _ in self.sections]}")

    def __repr__(self) -> str:
        heads = ", ".join(h for h, _ in self.sections)
        return f"Report({len(self.sections)} sections: {heads}; {len(self.metrics)} metrics; {self.wall!r})"

    def markdown(self) -> str:
        """The sections as one markdown document (without the title and config that `write_report` adds)."""
        return "\n\n".join(f"## {h}\n\n{b.strip()}" for h, b in self.sections)


def _second(cfg):
    return dataclasses.replace(cfg, model=cfg.second_model, second_model="")


@dataclass(frozen=True)
class Study:
    """A runnable study: `name` (its run folder under `cfg.out`), `title`, its `Config` class, `study(m, cfg, out)
    -> Report`, the CLI help `doc`; optional `check(cfg)` (run before any model loads), `second(cfg)` (the config
    the second model runs with; default: `cfg` with `model = cfg.second_model`) and the sub-folder `subdir` its
    figures go to."""

    name: str
    title: str
    config: type
    study: Callable[[Any, Any, Path], Report]
    doc: str = ""
    check: Callable[[Any], None] | None = None
    second: Callable[[Any], Any] = _second
    subdir: str = "second_model"

    def main(self, argv: Sequence[str] | None = None, cfg=None) -> tuple[Path, dict]:
        cfg = cfg if cfg is not None else cli.parse(self.config, argv, description=self.doc)
        if not isinstance(cfg, self.config):
            raise TypeError(f"cfg must be a {self.config.__module__}.{self.config.__name__}, got {type(cfg).__name__}")
        if getattr(cfg, "second_model", "") and cfg.second_model == cfg.model:
            raise InputError(f"--second-model {cfg.second_model!r} is --model: give another model, or none")
        if self.check is not None:
            self.check(cfg)
        runs = [cfg] + ([self.second(cfg)] if getattr(cfg, "second_model", "") else [])
        per_model = hasattr(cfg, "second_model")  # sections headed and metrics keyed by model
        out = run_dir(self.name, cfg.out)
        sections, metrics = [], {}
        for i, c in enumerate(runs):
            sub = out if i == 0 else out / self.subdir
            sub.mkdir(exist_ok=True)
            with Clock() as clock:
                m = models.load(c.model)
                clock.lap("model load")
                rep = self.study(m, c, sub)
            rep.wall = clock.wall
            rep.metrics["wall"] = rep.wall.as_dict()
            s = [*rep.sections, ("Wall time", rep.wall.markdown())]
            if i:  # the second model's figures are in its folder
                s = [(h, _relink(b, self.subdir)) for h, b in s]
            if per_model:
                s = [(f"{c.model}: {h}", b) for h, b in s]
            sections += s
            metrics[c.model] = rep.metrics
        metrics = undefined_to_none(metrics if per_model else metrics[cfg.model])
        report = write_report(out, self.title, cfg, sections, metrics)
        print(f"wrote {report}")
        return out, metrics


def _relink(body: str, subdir: str) -> str:
    """Markdown image / link targets that are bare file names, moved into `subdir/`."""
    return re.sub(r"\]\((?!https?:|/|#)([^)/]+)\)", rf"]({subdir}/\1)", body)
