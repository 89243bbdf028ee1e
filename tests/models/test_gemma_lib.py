"""models.gemma_lib: our parameters <-> Google's `gemma` library (Flax) trees and orbax checkpoints.

Exact round trips and the layout by hand here; logit parity with the library's own Flax forward, both ways
(their checkpoint into our forward, ours into theirs; tiny random Gemma 2 / Gemma 3 and the real
Gemma-3-270M), through tests/peers/_gemma_peer.py in the `.venv-gemma` overlay that `.ci/run` builds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from models import gemma_lib
from models.config import Config
from models.testing import tiny_config
from models.errors import ModelFileError, UnsupportedModelError
from models.params import init_params
from models.transformer import forward

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = Path(os.environ.get("GEMMA_OVERLAY", ROOT / ".venv-gemma"))
needs_peer = pytest.mark.skipif(not (OVERLAY / "gemma").is_dir(), reason=(
    f"gemma library overlay not found at {OVERLAY}: build it with .ci/run (or the `gemma_overlay` step there)"))

_COMMON = dict(vocab_size=89, d_model=32, d_head=16, d_mlp=48, n_ctx=64, norm_eps=1e-6, act="gelu_tanh",
               post_norms=True, embed_scale=32**0.5, attn_scale=16**-0.5, tie_embeddings=True)
TINY3 = tiny_config("gemma3", n_layers=7, n_heads=4, n_kv_heads=1, qk_norm=True, rope_theta=1e6, rope_local_theta=1e4,
               sliding_window=4, layer_types=("local",) * 5 + ("global", "local"), **_COMMON)
TINY2 = tiny_config("gemma2", n_layers=4, n_heads=4, n_kv_heads=2, rope_theta=1e4, attn_softcap=2.0, final_softcap=3.0,
               sliding_window=3, layer_types=("local", "global") * 2, **_COMMON)


def _random(cfg: Config, seed: int = 0):
    """Random weights with non-trivial norm scales (so a lost `1 +` shows)."""
    params = init_params(cfg, jax.random.key(seed), scale=0.2)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        x + 0.3 * jax.random.normal(k, x.shape) if jax.tree_util.keystr(p).endswith("['w']") else x
        for (p, x), k in zip(leaves, keys)])


def _equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("cfg", [TINY3, TINY2], ids=["gemma3", "gemma2"])
def test_layout_and_exact_round_trip(cfg, tmp_path):
    params = _random(cfg)
    tree = gemma_lib.to_gemma_params(params, cfg)
    b = params["blocks"]
    l3 = tree["layer_3"]
    np.testing.assert_array_equal(l3["attn"]["q_einsum"]["w"][1, :, 5], b["attn"]["W_Q"][3, :, 1, 5])
    np.testing.assert_array_equal(l3["attn"]["kv_einsum"]["w"][1, 0, :, 2], b["attn"]["W_V"][3, :, 0, 2])
    np.testing.assert_array_equal(l3["attn"]["attn_vec_einsum"]["w"], b["attn"]["W_O"][3])
    np.testing.assert_allclose(l3["pre_ffw_norm"]["scale"], np.asarray(b["ln2"]["w"][3]) - 1, rtol=0, atol=1e-7)
    gate = l3["mlp"]["gating_einsum"]
    assert gate.shape == ((2, 48, 32) if cfg.arch == "gemma3" else (2, 32, 48))  # the library's presets per family
    np.testing.assert_array_equal(gate[0].T if cfg.arch == "gemma3" else gate[0], b["mlp"]["W_gate"][3])
    back = gemma_lib.from_gemma_params(tree, cfg)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), back, params)
    gemma_lib.save_checkpoint(params, cfg, tmp_path / "ckpt")
    _equal(gemma_lib.load_checkpoint(tmp_path / "ckpt", cfg), back)


def test_fused_qkv_when_heads_equal_kv_heads():
    cfg = TINY2.replace(n_kv_heads=4)
    params = _random(cfg)
    tree = gemma_lib.to_gemma_params(params, cfg)
    assert "qkv_einsum" in tree["layer_0"]["attn"] and "q_einsum" not in tree["layer_0"]["attn"]
    np.testing.assert_array_equal(tree["layer_1"]["attn"]["qkv_einsum"]["w"][2, 3, :, 7], params["blocks"]["attn"]["W_V"][1, :, 3, 7])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), gemma_lib.from_gemma_params(tree, cfg), params)


def test_errors_name_the_problem():
    with pytest.raises(UnsupportedModelError, match="arch 'llama'"):
        gemma_lib.to_gemma_params({}, TINY3.replace(arch="llama", qk_norm=False))
    with pytest.raises(UnsupportedModelError, match="norm_eps=1e-05"):
        gemma_lib.to_gemma_params({}, TINY3.replace(norm_eps=1e-5))
    tree = gemma_lib.to_gemma_params(_random(TINY3), TINY3)
    del tree["layer_2"]["attn"]["_key_norm"]
    with pytest.raises(ModelFileError, match="layer_2/attn/_key_norm is missing"):
        gemma_lib.from_gemma_params(tree, TINY3)
    with pytest.raises(ModelFileError, match=r"\['layer_7'\] beyond the config's 7 layers"):
        gemma_lib.from_gemma_params({**tree, "layer_7": tree["layer_0"]}, TINY3)
    with pytest.raises(ModelFileError, match=r"\['W_E'\]: shape \(89, 32\), the config implies \(90, 32\)"):
        gemma_lib.from_gemma_params(gemma_lib.to_gemma_params(_random(TINY3), TINY3), TINY3.replace(vocab_size=90))


def test_config_from_gemma_mapping():
    fields = dict(num_embed=89, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=16, num_kv_heads=1,
                  final_logit_softcap=None, use_qk_norm=True, attention_types=["LOCAL_SLIDING"] * 5 + ["GLOBAL", "LOCAL_SLIDING"],
                  sliding_window_size=4, attn_logits_soft_cap=None, local_base_frequency=10_000,
                  global_base_frequency=1_000_000, local_scale_factor=1.0, global_scale_factor=1.0,
                  query_pre_attn_scalar=16**-0.5)
    assert gemma_lib.config_from_gemma(fields, n_ctx=64) == TINY3


def _peer(job: dict, tmp_path: Path) -> dict:
    job = {**job, "report": str(tmp_path / "report.json")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": str(OVERLAY), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "peers" / "_gemma_peer.py"), str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(proc.stdout)
    return json.loads((tmp_path / "report.json").read_text())


def _rel(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


@needs_peer
@pytest.mark.slow  # a second process importing the library and compiling its forward: ~1 min
def test_tiny_parity_both_ways_with_the_gemma_library(tmp_path):
    tokens = np.random.default_rng(0).integers(1, 89, (2, 12)).astype(np.int32)  # no 0: the library's pad id
    np.save(tmp_path / "tokens.npy", tokens)
    ours = {"gemma3": TINY3, "gemma2": TINY2}
    for name, cfg in ours.items():
        gemma_lib.save_checkpoint(_random(cfg, seed=3), cfg, tmp_path / f"ours_{name}")
    t = lambda p: str(tmp_path / p)  # noqa: E731
    report = _peer({
        "init": [{"name": n, "ckpt": t(f"theirs_{n}"), "tokens": t("tokens.npy"), "out": t(f"theirs_{n}.npy")} for n in ours],
        "forward": [{"ckpt": t(f"ours_{n}"), "config": dataclasses.asdict(c), "tokens": t("tokens.npy"), "out": t(f"ours_{n}.npy")}
                    for n, c in ours.items()],
    }, tmp_path)
    errs = {}
    for name, cfg in ours.items():
        # ours -> their forward
        ref, _ = forward(_random(cfg, seed=3), cfg, tokens)
        errs[f"ours->theirs {name}"] = _rel(ref, np.load(t(f"ours_{name}.npy")))
        # their checkpoint and config -> our forward
        their_cfg = gemma_lib.config_from_gemma(report["init"][name], n_ctx=64)
        assert json.loads(json.dumps(dataclasses.asdict(their_cfg))) == report["init"][name]["config_from_object"]
        got, _ = forward(gemma_lib.load_checkpoint(t(f"theirs_{name}"), their_cfg), their_cfg, tokens)
        errs[f"theirs->ours {name}"] = _rel(got, np.load(t(f"theirs_{name}.npy")))
    print(errs)
    assert max(errs.values()) < 1e-5, errs


@needs_peer
@pytest.mark.slow
def test_gemma3_270m_in_the_gemma_library(gemma3, tmp_path):
    """Our Gemma-3-270M (from the GGUF) exported, loaded by `gm.ckpts.load_params` into their `Gemma3_270M`
    preset: config equal to the preset, logits within 1e-3; the checkpoint reads back into ours exactly."""
    texts = ["The capital of France is Paris, and the capital of Italy is", "def fibonacci(n):\n    if n < 2:\n        return"]
    rows = [gemma3.tokenizer.encode(s, add_bos=True) for s in texts]
    tokens = np.asarray([r[: min(map(len, rows))] for r in rows], np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    gemma_lib.save_checkpoint(gemma3.params, gemma3.cfg, tmp_path / "ckpt")
    report = _peer({"forward": [{"ckpt": str(tmp_path / "ckpt"), "preset": "Gemma3_270M", "config": dataclasses.asdict(gemma3.cfg),
                                 "tokens": str(tmp_path / "tokens.npy"), "out": str(tmp_path / "theirs.npy")}]}, tmp_path)
    assert report["forward"][0]["config_mismatch"] == {}  # transformer_config(ours) == their preset
    assert report["forward"][0]["config_from_preset_mismatch"] == {}  # config_from_gemma(their preset) == ours
    theirs = np.load(tmp_path / "theirs.npy")
    ours, _ = forward(gemma3.params, gemma3.cfg, tokens)
    err = float(np.abs(np.asarray(ours) - theirs).max())
    print(f"max abs logit diff {err:.2e} (logit scale {np.abs(theirs).max():.1f}), top-1 agreement "
          f"{(np.asarray(ours).argmax(-1) == theirs.argmax(-1)).mean():.3f}")
    assert err < 1e-3
    assert (np.asarray(ours).argmax(-1) == theirs.argmax(-1)).all()
    back = gemma_lib.load_checkpoint(tmp_path / "ckpt", gemma3.cfg)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), back, gemma3.params)
