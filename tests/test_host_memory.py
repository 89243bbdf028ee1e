"""models.host_memory: with recycling on, a repeated call's large outputs land in pages earlier calls
already faulted in; without it every call faults its outputs in anew. Each case in its own process (the
setting is process-wide and must precede JAX's first computation)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (Linux only)")

_PROBE = textwrap.dedent("""
    import json, resource, sys
    import jax, jax.numpy as jnp
    from models import host_memory
    recycled = host_memory.recycle_freed_memory() if sys.argv[1] == "recycle" else False
    f = jax.jit(lambda x: (x[:, None] * jnp.ones((1, 1 << 14), jnp.float32)))  # [2048, 16384]: 128 MiB
    x = jnp.arange(2048, dtype=jnp.float32)
    jax.block_until_ready(f(x))
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = f(x); jax.block_until_ready(y); assert float(y[5, 7]) == 5.0; del y
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    try:
        host_memory.recycle_freed_memory()
        late = "no error"
    except RuntimeError as e:
        late = str(e)
    host_memory.trim()
    print(json.dumps(dict(recycled=recycled, faults=faults, late=late)))
""")


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_recycling_reuses_the_pages_of_freed_outputs():
    pages = (128 << 20) // 4096
    default, recycled = _probe("default"), _probe("recycle")
    assert not default["recycled"] and recycled["recycled"]
    assert min(default["faults"]) > 0.9 * pages, default  # glibc as it is: every call faults its 128 MiB in
    # recycled: once the heap holds the buffers in flight (measured: after 3 calls), the previous calls' pages
    assert max(recycled["faults"][-2:]) < 0.05 * pages, recycled
    assert "before the first JAX computation" in recycled["late"]
