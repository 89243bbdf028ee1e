"""Our attribution graphs against circuit-tracer's (the PyTorch reference, in its own venv .venv-circuit-tracer,
built by `./run peers`; tests/peers/_circuit_tracer_peer.py), on the same model weights and the same transcoders
written in circuit-tracer's format: the same active features and logit targets, and the same adjacency matrix."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import models
from saes.circuits.attribution import Graph, attribute
from saes.core.cross_layer import random_clt
from saes.core.transcoders import random_set
from saes.io import circuit_tracer

ROOT = Path(__file__).resolve().parents[2]
CT_PYTHON = Path(os.environ.get("CT_PYTHON") or ROOT / ".venv-circuit-tracer/bin/python")
needs_peer = pytest.mark.skipif(not CT_PYTHON.exists(), reason=f"circuit-tracer venv not found at {CT_PYTHON} (set "
                                "CT_PYTHON, or build it with ./run peers, as .ci/run does)")


def _peer(*args, timeout=900):
    env = {**os.environ, "CT_THREADS": str(os.cpu_count() or 1)}
    proc = subprocess.run([str(CT_PYTHON), str(ROOT / "tests/peers/_circuit_tracer_peer.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def compare(ours: Graph, peer: dict) -> dict:
    """Node sets equal; the largest relative difference of the adjacency over the edges the pruned graph keeps
    and over all edges (relative to the largest edge)."""
    np.testing.assert_array_equal(ours.active_features, peer["active_features"])
    np.testing.assert_allclose(ours.activation_values, peer["activation_values"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ours.logit_tokens, peer["logit_targets"])
    A, B = ours.adjacency, peer["adjacency_matrix"]
    assert A.shape == B.shape
    kept = ours.prune().edge_mask
    scale = np.abs(B).max()
    rel_kept = float(np.max(np.abs(A - B)[kept] / np.maximum(np.abs(B[kept]), 1e-6 * scale)))
    return dict(rel_kept=rel_kept, rel_all=float(np.abs(A - B).max() / scale), kept=int(kept.sum()))


@needs_peer
@pytest.mark.parametrize("arch,skip", [("relu", False), ("jumprelu", False), ("relu", True)])
def test_adjacency_matches_circuit_tracer_on_a_tiny_llama(arch, skip, tmp_path):
    """The same random transcoders (skip transcoders too: circuit-tracer's `W_skip`) exported in circuit-tracer's
    format: its adjacency matrix on the same prompt equals ours."""
    _peer("--make-tiny", tmp_path)
    m = models.load(tmp_path / "model", tokenizer=False)
    tcs = random_set(m.cfg, arch, 48, bias=0.1, dec_scale=0.3, threshold=0.05, skip_scale=0.5 if skip else None)
    circuit_tracer.write(tcs, tmp_path / "ours")
    tokens = [1, 5, 9, 17, 33, 60, 7, 12]
    _peer("--model", tmp_path / "model", "--transcoders", tmp_path / "ours", "--tokens", json.dumps(tokens),
          "--out", tmp_path / "peer.npz", "--max-n-logits", 5)
    peer = dict(np.load(tmp_path / "peer.npz"))
    np.testing.assert_array_equal(peer["input_tokens"], tokens)
    np.testing.assert_allclose(models.forward(m, np.asarray([tokens])).logits[0, -1], peer["last_logits"], atol=1e-4)
    ours = attribute(m, tcs, np.asarray(tokens), max_n_logits=5)
    r = compare(ours, peer)
    assert ours.n_features > 50 and r["kept"] > 20
    assert r["rel_kept"] <= 1e-3 and r["rel_all"] <= 1e-4, r


@needs_peer
@pytest.mark.parametrize("arch,site", [("relu", "resid_mid"), ("jumprelu", "ln2.normalized")])
def test_cross_layer_adjacency_matches_circuit_tracer(arch, site, tmp_path):
    """A random cross-layer transcoder (reading circuit-tracer's default hook_resid_mid, or mlp.hook_in) on a
    3-layer tiny Llama, written as circuit-tracer's CLT files and read by its `load_clt`: the same adjacency."""
    _peer("--make-tiny", tmp_path, "--n-layers", 3)
    m = models.load(tmp_path / "model", tokenizer=False)
    clt = random_clt(m.cfg, arch, 48, bias=0.1 if site == "ln2.normalized" else 0.0, dec_scale=0.3, threshold=0.05,
                     act_scale=1.2, site=site)
    circuit_tracer.write(clt, tmp_path / "clt")
    tokens = [1, 5, 9, 17, 33, 60, 7, 12]
    _peer("--model", tmp_path / "model", "--transcoders", tmp_path / "clt", "--tokens", json.dumps(tokens),
          "--out", tmp_path / "peer.npz", "--max-n-logits", 5)
    peer = dict(np.load(tmp_path / "peer.npz"))
    ours = attribute(m, clt, np.asarray(tokens), max_n_logits=5)
    r = compare(ours, peer)
    print(f"CLT {arch} {site} vs circuit-tracer:", r, "features", ours.n_features)
    assert ours.n_features > 50 and r["kept"] > 20
    assert r["rel_kept"] <= 1e-3 and r["rel_all"] <= 1e-4, r


@needs_peer
def test_partial_graph_matches_circuit_tracer(tmp_path):
    """`max_feature_nodes` below the active count: the same features chosen (two rounds of influence ranking,
    circuit-tracer's `update_interval` 4 x batch 8 = our `update_every` 32) and the same partial adjacency."""
    _peer("--make-tiny", tmp_path)
    m = models.load(tmp_path / "model", tokenizer=False)
    tcs = random_set(m.cfg, "relu", 48, bias=0.1, dec_scale=0.3)
    circuit_tracer.write(tcs, tmp_path / "ours")
    tokens = [1, 5, 9, 17, 33, 60, 7, 12]
    _peer("--model", tmp_path / "model", "--transcoders", tmp_path / "ours", "--tokens", json.dumps(tokens),
          "--out", tmp_path / "peer.npz", "--max-n-logits", 5, "--batch-size", 8, "--max-feature-nodes", 45)
    peer = dict(np.load(tmp_path / "peer.npz"))
    ours = attribute(m, tcs, np.asarray(tokens), max_n_logits=5, max_feature_nodes=45, update_every=32, chunk=8)
    assert ours.n_active == len(peer["active_features"]) > 100
    np.testing.assert_array_equal(ours.active_features, peer["active_features"][peer["selected_features"]])
    A, B = ours.adjacency, peer["adjacency_matrix"]
    assert A.shape == B.shape == (45 + m.cfg.n_layers * 8 + 8 + 5,) * 2
    assert np.abs(A - B).max() <= 1e-4 * np.abs(B).max()


@needs_peer
@pytest.mark.slow
def test_adjacency_matches_circuit_tracer_on_smollm2(tmp_path):
    from models.loading import resolve

    m = models.load("smollm2-135m-instruct", dtype="float32")
    tcs = random_set(m.cfg, "relu", 64, bias=-0.015, dec_scale=0.3, threshold=0.05)  # about 1 in 6 fires
    circuit_tracer.write(tcs, tmp_path / "tc")
    text = "<|im_start|>The capital of France is"
    tokens = [int(t) for t in m.to_tokens(text)[0]]
    assert tokens[0] == 1  # circuit-tracer prepends a special token otherwise
    _peer("--model", resolve("smollm2-135m-instruct"), "--transcoders", tmp_path / "tc", "--tokens", json.dumps(tokens),
          "--out", tmp_path / "peer.npz", "--max-n-logits", 5, "--batch-size", 128)
    peer = dict(np.load(tmp_path / "peer.npz"))
    np.testing.assert_allclose(models.forward(m, np.asarray([tokens])).logits[0, -1], peer["last_logits"], atol=2e-3)
    ours = attribute(m, tcs, np.asarray(tokens), max_n_logits=5)
    r = compare(ours, peer)
    print("smollm2 vs circuit-tracer:", r, "features", ours.n_features)
    assert 500 < ours.n_features < 4000 and r["rel_kept"] <= 1e-3, r
