"""Errors raised by `models`, each naming its cause, and the range checks that raise them for config fields."""

import math


class ModelError(Exception):
    """Base class for errors about models, their files and their inputs."""


class UnknownModelError(ModelError, KeyError):
    """A short name that is not in the registry and is not a path."""

    def __str__(self) -> str:  # KeyError would print the repr
        return str(self.args[0])


class ModelFileError(ModelError):
    """A missing, corrupt or truncated model file, or one whose contents do not match its config."""


class UnsupportedModelError(ModelError):
    """An architecture, quantisation or option this package does not implement."""


class InputError(ModelError, ValueError):
    """Input of the wrong shape, or longer than the model's context."""


class InsufficientMemoryError(ModelError, MemoryError):
    """Loading would need more memory than the host or a device has free (both numbers in the message)."""


def check_field(name: str, value, *, lo=None, hi=None, integer: bool = False, open_lo: bool = False,
                open_hi: bool = False, choices=None, each: bool = False, nonempty: bool = True) -> None:
    """InputError naming a config field (and its flag) unless `value` is in range: a finite number (an `int` when
    `integer`; NaN and Inf are never in range) within `lo`/`hi` (exclusive when `open_lo`/`open_hi`), or one of
    `choices`. `each`: `value` is a tuple whose every element is checked (non-empty unless `nonempty=False`)."""
    flag = "--" + name.replace("_", "-")
    if each:
        if not isinstance(value, (tuple, list)) or (nonempty and not value):
            raise InputError(f"{name} ({flag}) must be a non-empty comma-separated list, got {value!r}")
        for v in value:
            check_field(name, v, lo=lo, hi=hi, integer=integer, open_lo=open_lo, open_hi=open_hi, choices=choices)
        return
    if choices is not None:
        if value not in choices:
            raise InputError(f"{name} ({flag}) must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return
    kind = "an integer" if integer else "a finite number"
    bounds = [f"{'>' if open_lo else '>='} {lo}"] if lo is not None else []
    bounds += [f"{'<' if open_hi else '<='} {hi}"] if hi is not None else []
    what = f"{kind} {' and '.join(bounds)}".strip()
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and not isinstance(value, bool)
    if ok and lo is not None:
        ok = value > lo if open_lo else value >= lo
    if ok and hi is not None:
        ok = value < hi if open_hi else value <= hi
    if not ok:
        raise InputError(f"{name} ({flag}) must be {what}, got {value!r}")


def check_dtype(dtype, name: str = "dtype") -> None:
    """InputError unless `dtype` names a floating dtype JAX computes in (float32, bfloat16, float16)."""
    if dtype not in MODEL_DTYPES:
        raise InputError(f"{name} (--{name.replace('_', '-')}) must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")


MODEL_DTYPES = ("float32", "bfloat16", "float16")
