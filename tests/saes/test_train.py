"""The trainer: exact resume after a kill, NaN stops, cache == live, metrics/report files, the typed CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import saes
from saes.train.data import ArraySource
from saes.train.synthetic import planted_source
from saes.train.loop import TrainConfig, TrainingDiverged, cli_parser

ROOT = Path(__file__).resolve().parents[2]

# A run on synthetic data; SLOW_CHUNK seconds of sleep per chunk so the parent can kill it mid-run.
WORKER = textwrap.dedent("""
    import sys, time
    import saes
    from saes.train.synthetic import planted_source
    out, arch, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])
    src, _ = planted_source(d_in=16, n_atoms=32, chunk_tokens=2048, seed=5)
    make = src.make
    def slow_make(i):
        time.sleep(slow)
        return make(i)
    src.make = slow_make
    cfg = saes.TrainConfig(arch=arch, width=64, k=3, tokens=256 * 120, batch_size=256, chunk_tokens=2048,
                           lr=2e-3, lr_warmup_steps=10, dead_tokens=4096, out=out, progress=False, log_every=10,
                           checkpoint_every=10, eval_every=0, keep_checkpoints=3)
    saes.fit(cfg, source=src)
    print("FINISHED")
""")


def _run(script: Path, out: Path, arch: str, slow: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, str(script), str(out), arch, str(slow)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))


def _weights(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(out / "saes" / "synthetic" / "sae.safetensors"))


@pytest.mark.parametrize("arch", ["batchtopk"])  # the arch with the most state (threshold buffer, AuxK)
def test_killed_run_resumes_bit_identically(arch, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ref = _run(script, tmp_path / "ref", arch, 0.0)
    killed = _run(script, tmp_path / "killed", arch, 0.4)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until a checkpoint past step 40 exists, then kill -9
        steps = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
        if steps and max(steps) >= 40:
            break
        assert killed.poll() is None, killed.communicate()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "saes").exists(), "the run finished before it could be killed"
    resumed = _run(script, tmp_path / "killed", arch, 0.0)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "FINISHED" in out, err[-3000:]
    assert "resuming" in err
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "killed")
    assert set(a) == set(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name} differs after resume"
    # the resumed run's metrics log continues the killed one's without duplicates
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 120


def test_nan_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    src, _ = planted_source(d_in=16, n_atoms=32, chunk_tokens=2048, seed=0)

    def make(i):  # the third chunk is poisoned
        x = src.make(i)["synthetic"]
        return {"synthetic": x * jnp.nan if i == 2 else x}

    poisoned = ArraySource(make, src.hooks, src.d_in)
    cfg = TrainConfig(arch="topk", width=64, k=3, tokens=256 * 40, batch_size=256, chunk_tokens=2048, out=str(tmp_path),
                      progress=False, log_every=5, checkpoint_every=5, eval_every=0, keep_checkpoints=2)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss or parameters at step 17.*Last good checkpoint: step 15"):
        saes.fit(cfg, source=poisoned)
    from saes.train.loop import Checkpointer, fresh_state
    from saes.train.state import abstract_state
    import jax

    ck = Checkpointer(tmp_path / "checkpoints", 2)
    assert ck.latest() == 15
    template = jax.eval_shape(lambda: fresh_state(cfg, {"synthetic": ("synthetic", None, 16)}, jax.random.key(0)))
    state, meta = ck.restore(abstract_state(template, None))
    assert int(state.step) == 15 and meta["chunk_index"] == 1 and int(state.bad_step) == -1
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.saes))


def test_cache_trains_exactly_like_live(tmp_path):
    src, _ = planted_source(d_in=16, n_atoms=32, chunk_tokens=2048, seed=7)
    cache = saes.cache_activations(src, tmp_path / "cache", tokens=2048 * 3, progress=False)
    assert cache.n_chunks == 3 and cache.d_in == {"synthetic": 16}
    base = dict(arch="relu", width=48, tokens=256 * 24, batch_size=256, chunk_tokens=2048, progress=False,
                log_every=8, checkpoint_every=100, eval_every=0)
    live = saes.fit(TrainConfig(out=str(tmp_path / "live"), **base), source=src)
    cached = saes.fit(TrainConfig(out=str(tmp_path / "cached"), cache=str(tmp_path / "cache"), **base))
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "act_scale"):
        np.testing.assert_array_equal(getattr(live.saes["synthetic"], name), getattr(cached.saes["synthetic"], name))


def test_outputs_metrics_and_report(tmp_path):
    src, _ = planted_source(d_in=16, n_atoms=32, chunk_tokens=2048, seed=0)
    cfg = TrainConfig(arch="topk", width=64, k=3, tokens=256 * 20, batch_size=256, chunk_tokens=2048, out=str(tmp_path),
                      progress=False, log_every=5, checkpoint_every=10, eval_every=0, lr_warmup_steps=5)
    run = saes.fit(cfg, source=src)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10, 15, 20]
    for key in ("mse", "fvu", "explained_variance", "l0", "dead_frac", "dense_frac", "loss", "auxk"):
        assert np.isfinite(lines[-1]["synthetic"][key]), key
    assert {"lr", "grad_norm", "sparsity_coeff", "tokens_per_s"} <= set(lines[-1])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 20 and "synthetic" in report["hooks"]
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    assert TrainConfig.from_json(json.loads((tmp_path / "config.json").read_text())) == cfg
    loaded = saes.load_run(tmp_path)["synthetic"]
    np.testing.assert_array_equal(loaded.W_dec, run.saes["synthetic"].W_dec)
    # lr: linear warm-up then linear decay to 0 over the last 20%
    lrs = [r["lr"] for r in lines]  # means over each logging window
    assert lrs[0] < lrs[1] == pytest.approx(cfg.lr) and lrs[-1] < lrs[1]


def test_cli_is_typed_from_the_config():
    ns = cli_parser().parse_args(["--site", "resid_post,mlp_out", "--layers", "10,15", "--arch", "topk", "--k", "32",
                               "--width", "8192", "--tokens", "2_000_000", "--normalize", "false", "--lr", "1e-4"])
    cfg = TrainConfig(**vars(ns))
    assert cfg.site == ("resid_post", "mlp_out") and cfg.layers == (10, 15) and cfg.tokens == 2_000_000
    assert cfg.normalize is False and cfg.lr == 1e-4 and cfg.width == 8192 and cfg.steps == 2_000_000 // 4096
    with pytest.raises(SystemExit):
        cli_parser().parse_args(["--width", "lots"])


def test_cli_help_runs():
    proc = subprocess.run([sys.executable, "-m", "saes.train", "--help"], capture_output=True, text=True, cwd=str(ROOT),
                          timeout=120)
    assert proc.returncode == 0 and "--sparsity-coeff" in proc.stdout and "--feature-parallel" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr  # `saes` does not import saes.train.loop eagerly (`python -m saes.train` runs saes/train/__main__.py)
    proc = subprocess.run([sys.executable, "-m", "saes.train.cache", "--help"], capture_output=True, text=True, cwd=str(ROOT),
                          timeout=120)
    assert proc.returncode == 0 and "python -m saes.train.cache" in proc.stdout
