"""Sweeps on a device mesh give the numbers of one device: 8 simulated CPU devices in a subprocess, and two
processes joined by `jax.distributed` on localhost (4 global devices)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

COMMON = """
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
import models, interp
from models.testing import random_model, tiny_config
cfg = tiny_config(vocab_size=40)
m = random_model(cfg, jax.random.key(0))
tokens = jax.random.randint(jax.random.key(1), (4, 6), 0, 40)
mask = jnp.ones_like(tokens)
metric = interp.LogitDiff(jnp.asarray([1, 2, 3, 4]), jnp.asarray([5, 6, 7, 8]))
corrupt = jax.random.randint(jax.random.key(2), (4, 6), 0, 40)

def run(mesh=None, rules=None):
    return {
        "heads": interp.head_ablation(m, tokens, mask, metric, kind="mean", mesh=mesh).tolist(),
        "patch": interp.sweep(m, corrupt, mask, metric, (interp.Replace("resid_pre",
                 models.forward(m, tokens, mask, capture=["resid_pre"])[1]["resid_pre"]),),
                 where=interp.sweeps.one_hot_items(3, 6, "tokens"), mesh=mesh, rules=rules).tolist(),
    }
"""

EIGHT = COMMON + """
from models.sharding import sweep_mesh
assert jax.device_count() == 8
out = {"single": run()}
out["data8"] = run(sweep_mesh())
out["data4_model2"] = run(sweep_mesh(model=2))
out["batch_on_model"] = run(sweep_mesh(model=2), rules=(("sweep", "data"), ("batch", "model"), ("heads", None)))
print("RESULT" + json.dumps(out))
"""

WORKER = """
import sys
import models, interp, saes  # importing touches no device, so initialize may follow
from models import sharding as meshlib
meshlib.initialize(sys.argv[1], 2, int(sys.argv[2]))  # before any computation
""" + COMMON + """
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
print("RESULT" + json.dumps(run(meshlib.sweep_mesh())))
"""


def _run(code: str, devices: int, *args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _result(proc: subprocess.Popen, timeout: float = 300) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[len("RESULT"):])


def _close(a, b):
    for key in a:
        np.testing.assert_allclose(np.asarray(b[key]), np.asarray(a[key]), atol=2e-5, err_msg=key)


def test_eight_simulated_devices_match_one():
    out = _result(_run(EIGHT, 8))
    for layout in ("data8", "data4_model2", "batch_on_model"):
        _close(out["single"], out[layout])


def test_two_processes_with_jax_distributed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_run(WORKER, 2, f"127.0.0.1:{port}", str(i)) for i in range(2)]
    try:
        results = [_result(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    single = _result(_run(COMMON + "\nprint('RESULT' + json.dumps(run()))", 1))
    for r in results:  # every process holds the whole (replicated) result
        _close(single, r)
