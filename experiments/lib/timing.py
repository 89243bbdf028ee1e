"""Where a study's wall time goes: compile, generation and the rest of the compute, and named phases.

    with Clock() as clock:                # the study runner opens one per model
        ...                               # JAX compiles are timed from jax.monitoring's events
        lap("selection")                  # a named phase ends (seconds since the previous lap)
        with generating():                # decoding outside `models.generate` (which reports itself); block on the
            np.asarray(new_tokens)        # result inside, as JAX dispatches asynchronously; compiles inside count
                                          # as compile
    clock.wall                            # WallTime: total, compile, generation, compute, phases, load

`lap` and `generating` act on the clock that is open (the runner's), and do nothing when none is: a study's
functions call them without being handed a clock. Compile time is the union of JAX's trace, lowering and backend
compile spans (`/jax/core/compile/*` time-span events, so a nested trace is not counted twice); a persistent
compilation-cache hit counts as the (short) compile it is.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import jax

from models.generate import GENERATE_EVENT

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")

_OPEN: list["Clock"] = []


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _overlap(spans: list[tuple[float, float]], windows: list[tuple[float, float]]) -> float:
    """Seconds of the (disjoint) `spans` inside the (disjoint) `windows`."""
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in spans for c, d in windows)


def _on_span(event: str, start: float, end: float, **_) -> None:
    if event in COMPILE_EVENTS:
        for c in _OPEN:
            c._compiles.append((start, end))
    elif event == GENERATE_EVENT:
        for c in _OPEN:
            c._generation.append((start, end))


@dataclass(frozen=True)
class WallTime:
    """One run's wall seconds: `total = compile + generation + compute`, with named `phases` (in order) and the
    1-minute load average at the start and the end (what else the machine was doing)."""

    total: float
    compile: float
    generation: float
    phases: dict[str, float] = field(default_factory=dict)
    load: tuple[float, float] = (float("nan"), float("nan"))

    @property
    def compute(self) -> float:
        """Everything else: forwards, sweeps, training, Python."""
        return max(0.0, self.total - self.compile - self.generation)

    def __repr__(self) -> str:
        return (f"WallTime({self.total:.0f} s: compile {self.compile:.0f}, generation {self.generation:.0f}, "
                f"compute {self.compute:.0f}; load {self.load[0]:.1f} -> {self.load[1]:.1f})")

    def markdown(self) -> str:
        """A sentence with the split, then the phases (a table when there are any)."""
        pct = lambda x: f"{100 * x / self.total:.0f}%" if self.total > 0 else "-"  # noqa: E731
        text = (f"{self.total:.0f} s wall: compile {self.compile:.0f} s ({pct(self.compile)}), generation "
                f"{self.generation:.0f} s ({pct(self.generation)}), other compute {self.compute:.0f} s "
                f"({pct(self.compute)}). 1-minute load average {self.load[0]:.1f} at the start, {self.load[1]:.1f} at "
                f"the end ({os.cpu_count()} CPUs).")
        if self.phases:
            text += "\n\n| phase | seconds |\n|---|---|\n" + "\n".join(f"| {k} | {v:.0f} |" for k, v in self.phases.items())
        return text

    def as_dict(self) -> dict:
        return dict(total=self.total, compile=self.compile, generation=self.generation, compute=self.compute,
                    phases=dict(self.phases), load=list(self.load))


class Clock:
    """Times one run (a context manager); `wall` is its `WallTime` once closed (or so far, while open)."""

    _listening = False

    def __init__(self, verbose: bool = True):
        self.verbose = verbose
        self._compiles: list[tuple[float, float]] = []
        self._generation: list[tuple[float, float]] = []
        self._phases: dict[str, float] = {}
        self._start = self._last = self._end = None
        self._load = (float("nan"), float("nan"))

    def __enter__(self) -> "Clock":
        if not Clock._listening:  # one listener for the process; it feeds whichever clocks are open
            jax.monitoring.register_event_time_span_listener(_on_span)
            Clock._listening = True
        self._start = self._last = time.time()
        self._load = (os.getloadavg()[0], float("nan"))
        _OPEN.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self._end = time.time()
        self._load = (self._load[0], os.getloadavg()[0])
        _OPEN.remove(self)

    def lap(self, name: str) -> float:
        """End the phase `name`: its seconds since the previous lap (a repeated name adds up)."""
        now = time.time()
        dt, self._last = now - self._last, now
        self._phases[name] = self._phases.get(name, 0.0) + dt
        if self.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {dt:.0f} s", flush=True)
        return dt

    @contextmanager
    def generating(self):
        t0 = time.time()
        try:
            yield
        finally:
            self._generation.append((t0, time.time()))

    @property
    def wall(self) -> WallTime:
        end = self._end if self._end is not None else time.time()
        compiles = _union(self._compiles)
        gen = _union(self._generation)
        compile_s = sum(b - a for a, b in compiles)
        gen_s = sum(b - a for a, b in gen) - _overlap(compiles, gen)
        return WallTime(total=end - self._start, compile=compile_s, generation=max(0.0, gen_s),
                        phases=dict(self._phases), load=self._load)


def lap(name: str) -> None:
    """End the phase `name` on the open clock (the runner's); nothing when no clock is open."""
    if _OPEN:
        _OPEN[-1].lap(name)


@contextmanager
def generating():
    """Mark decoding (`with generating(): ...`) on the open clock; nothing when no clock is open."""
    if _OPEN:
        with _OPEN[-1].generating():
            yield
    else:
        yield
