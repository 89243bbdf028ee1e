"""JAX's persistent compilation cache for the command lines (studies, `saes.train.loop`, `saes.train.cache`, the demo).

A study compiles dozens of programs (one per shape of forward, sweep and generation step); with the cache on, a
second run of the same command loads them from disk instead of compiling again. Every `models.cli.parse` command
turns it on, in `$XDG_CACHE_HOME/interp/jax-compilation` (default `~/.cache/interp/jax-compilation`); set
`INTERP_COMPILATION_CACHE` to another directory, or pass `--compilation-cache off` (or set the variable to `off`)
to opt out. Library calls never turn it on by themselves: `enable()` does, from a script or notebook.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["ENV", "OFF", "default_dir", "enable"]

ENV = "INTERP_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no", "none")


def default_dir() -> Path:
    """The default persistent-cache directory: `$XDG_CACHE_HOME/interp/jax-compilation` (`~/.cache/...`)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "interp" / "jax-compilation"


def enable(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on the persistent compilation cache in `path` (default: `$INTERP_COMPILATION_CACHE`, else
    `default_dir()`); `"off"` (or the variable set to it) leaves it off. Returns the directory, or None when off.
    Programs that compile in under a second are not written (JAX's threshold)."""
    setting = str(path) if path is not None else os.environ.get(ENV, "")
    if setting.strip().lower() in OFF:
        return None
    where = Path(setting).expanduser() if setting.strip() else default_dir()
    where.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return where
