"""Shared fixtures: the embedded models (ours and transformers' reference), loaded once per session."""

from __future__ import annotations

import gc
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Study CLIs called by the tests compile in the test process: no persistent compilation cache there
# (models.compile_cache; tests/test_compile_cache.py turns it on in subprocesses of its own).
os.environ.setdefault("INTERP_COMPILATION_CACHE", "off")
# Tests run each program once or twice on tiny inputs: compile time, not run time, is most of the suite. LLVM's
# optimisation passes are what XLA's CPU compiler spends it on (measured: a study smoke run 91 s -> 61 s). They can
# move float rounding in the last bits (FMA contraction): every tolerance of the suite holds without them except
# the 8-device SAE training comparison (12 Adam steps amplify it: 1.4e-5 against its 1e-5), whose subprocess runs
# with the user's flags (INTERP_USER_XLA_FLAGS). INTERP_TEST_FULL_OPT=1 keeps XLA's defaults everywhere.
os.environ.setdefault("INTERP_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
if os.environ.get("INTERP_TEST_FULL_OPT") != "1":
    # built from the user's flags, not appended to XLA_FLAGS: xdist workers inherit the controller's (already set)
    os.environ["XLA_FLAGS"] = " ".join([os.environ["INTERP_USER_XLA_FLAGS"], "--xla_backend_optimization_level=0",
                                        "--xla_llvm_disable_expensive_passes=true"]).strip()


@pytest.fixture(autouse=True)
def _return_freed_memory():
    """After each test, give the memory it freed back to the system. glibc keeps freed blocks in its
    per-thread arenas (XLA's threads use many): a worker that ran the SmolLM2 transcoder tests held 11.6 GB
    of RSS, 3.5 GB of it live, and the next test's peak on top of that was killed by the OOM killer (24 GB,
    two workers). `malloc_trim(0)` returns the free pages (measured: 5.1 -> 0.8 GB after that test alone).
    Only above 3 GiB resident: trimming after every small test costs the next one its page faults again."""
    from models import host_memory

    yield
    if host_memory.resident_bytes() > 3 << 30:
        gc.collect()
        host_memory.trim()


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """After each test module, drop JAX's compiled programs and traces when the worker holds more than 4 GiB: a
    worker keeps every executable of every module it ran (the suite's last CI run lost a worker near its end, its
    RSS grown to 5-7 GB beside the other worker's), and a later module rarely reuses another module's programs."""
    from models import host_memory

    yield
    if host_memory.resident_bytes() > 4 << 30:
        import jax

        jax.clear_caches()
        gc.collect()
        host_memory.trim()


@pytest.fixture(scope="session")
def tiny_smollm2(tmp_path_factory) -> str:
    """A random 4-layer Llama with SmolLM2's tokenizer and chat template, as a Hugging Face directory: the
    studies' smoke tests run their pipelines on it (tests/_tiny_studies.py)."""
    from tests._tiny_studies import tiny_like

    return str(tiny_like("smollm2-135m-instruct", tmp_path_factory.mktemp("tiny") / "smollm2"))


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> str:
    """A random 4-layer Gemma 3 with Gemma 3's tokenizer (262k vocabulary), as a Hugging Face directory."""
    from tests._tiny_studies import tiny_like

    return str(tiny_like("gemma-3-270m", tmp_path_factory.mktemp("tiny") / "gemma3"))


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
