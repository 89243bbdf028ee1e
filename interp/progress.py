"""Progress bars for sweeps and collections: a tqdm bar on stderr that appears once a call has run for
`DELAY_S` seconds. Off with the environment variable `INTERP_PROGRESS=0` or `progress=False` on the call
(`progress=True` forces it on)."""

from __future__ import annotations

import os
from typing import Iterable

DELAY_S = 3.0


def enabled(progress: bool | None = None) -> bool:
    """`progress` if given, else the environment (`INTERP_PROGRESS`, default on)."""
    if progress is not None:
        return bool(progress)
    return os.environ.get("INTERP_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def bar(total: int | None, desc: str, progress: bool | None = None, unit: str = "item", iterable: Iterable | None = None):
    """A tqdm bar of `total` steps, or over `iterable` (a silent pass-through when disabled)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled(progress), delay=DELAY_S,
                leave=False, dynamic_ncols=True)


def iterate(iterable: Iterable, desc: str, progress: bool | None = None, unit: str = "item"):
    """`iterable` wrapped in a bar; its length is the bar's total."""
    return bar(None, desc, progress, unit, iterable)
