"""Helpers shared by the benchmarks: median timing, the machine's matmul peak, a results table, peers' environments."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of each timed call (after warm-up)."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> str:
        return f"{min(self.times) * 1e3:.0f}-{max(self.times) * 1e3:.0f} ms"

    def per_second(self, units: float) -> float:
        """Throughput in `units` per second at the median time (e.g. tokens per call)."""
        return units / self.median


def time_median(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> Timing:
    """Call `fn` `warmup` times untimed, then `repeats` times timed. `fn` must block until its work is done
    (`jax.block_until_ready`, or a synchronous torch call on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times))


def matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 10) -> float:
    """FLOP/s of a jitted `n`×`n` @ `n`×`n` JAX matmul on the default device (median of `repeats`)."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(jnp.matmul)
    t = time_median(lambda: jax.block_until_ready(f(a, b)), repeats, warmup=2)
    return 2 * n**3 / t.median


def allocator_flag(parser) -> None:
    """`--glibc-default`: measure with glibc's allocator as it is, instead of `models.host_memory`'s recycling."""
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave glibc's allocator as it is (default: models.host_memory.recycle_freed_memory, "
                             "so large buffers are reused between calls instead of faulted in anew)")


def set_allocator(args) -> tuple[bool, str]:
    """Applies `--glibc-default` (before any JAX computation): whether host memory is recycled, and the
    allocator's name for the report."""
    from models import host_memory

    if not args.glibc_default and host_memory.recycle_freed_memory():
        return True, "host memory recycled (models.host_memory.recycle_freed_memory)"
    return False, "glibc allocator as it is"


def machine() -> str:
    """One line describing where the numbers were taken (load average included: other users add noise)."""
    import jax

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()}, "
            f"load average {load}")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"
    return str(x)


def peer_python(env_var: str, venv: str) -> Path:
    """A peer's interpreter (peers that pin each other's versions live in their own environments): `$env_var` if
    set, else the repository's `venv` (built by `./run peers`, as .ci/run does). It may not exist: check."""
    return Path(os.environ.get(env_var) or ROOT / venv / "bin" / "python")


def export_hf_dir(path: Path) -> Path:
    """SmolLM2 as a float32 Hugging Face directory (from the registry's GGUF), for TransformerLens."""
    if (path / "model.safetensors").exists():
        return path
    import torch
    import transformers

    from models.loading import resolve

    gguf = resolve("smollm2-135m-instruct")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = hf.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(hf.state_dict())
    plain.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(path)
    return path


def tl_head_ablations(tl_python: Path, hf_dir: Path, tokens, correct, wrong, heads) -> dict | None:
    """TransformerLens zero-ablating each of `heads` `[N, 2]` alone on `tokens` (`tests/peers/_tl_peer.py`, in its
    own venv at `tl_python`): `{"effects", "seconds", ...}` per head, or None (with a printed reason) if the peer
    is absent or fails."""
    if not (tl_python and Path(tl_python).exists()):
        print(f"TransformerLens peer not found at {str(tl_python)!r} (./run peers builds .venv-tl): its rows are left out")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        inputs, out = Path(tmp) / "inputs.npz", Path(tmp) / "out.json"
        np.savez(inputs, tokens=np.asarray(tokens), correct=np.asarray(correct), wrong=np.asarray(wrong),
                 heads=np.asarray(heads))
        run = subprocess.run([str(tl_python), str(ROOT / "tests" / "peers" / "_tl_peer.py"), str(export_hf_dir(hf_dir)),
                              str(inputs), str(out)], capture_output=True, text=True)
        if run.returncode:
            print("TransformerLens peer failed:\n" + run.stderr[-2000:])
            return None
        return json.loads(out.read_text())
