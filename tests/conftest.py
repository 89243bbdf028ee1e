"""Shared fixtures: the embedded models (ours and transformers' reference), loaded once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# JAX's persistent compilation cache, shared by the xdist workers, the tests' subprocesses and notebook kernels
# (they inherit the environment) and kept between runs: the same SmolLM2 programs are compiled once, not in each
# process. Keyed by the program, JAX version and flags, so it never serves a stale executable;
# INTERP_JAX_CACHE=0 turns it off, INTERP_JAX_CACHE=DIR moves it.
_cache = os.environ.get("INTERP_JAX_CACHE", "")
if _cache != "0":
    _cache = _cache or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "interp", "jax")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_collection_modifyitems(items):
    """Longest first, so that pytest-xdist's workers do not end on one long test: the studies' smoke runs
    (minutes each), then the other `slow` tests, then the rest (a stable sort: the same order on every worker)."""
    items.sort(key=lambda item: 0 if "smoke" in item.name else 1 if item.get_closest_marker("slow") else 2)


@pytest.fixture(scope="session")
def smollm2():
    import models

    return models.load("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="session")
def gemma3():
    import models

    return models.load("gemma-3-270m", dtype="float32")


def load_reference(name: str):
    """transformers' model and tokenizer for a registered GGUF, dequantised to float32."""
    import torch
    import transformers

    from models.loading import resolve

    path = resolve(name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok
