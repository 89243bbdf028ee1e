"""Trainable interventions (DAS, Boundless DAS, LoReFT), their grid trainer and save / load, on tiny random
models: orthonormality by construction, the full-rank interchange is activation patching, training changes the
intervention only, a planted causal variable is found at its (layer, position) above a random-subspace null, and a
saved intervention reloads bit-identically and refuses another model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from interp import interventions as I
from models.testing import random_model, tiny_config
from interp.trainable import (BoundlessInterchange, Interchange, LoReFT, das_grid, init_loreft, load, orthonormal,
                              save)
from models.errors import InputError


@pytest.fixture(scope="module")
def tiny():
    return random_model(tiny_config("llama"), jax.random.key(0))


def test_orthonormal_is_a_projection_onto_rotations():
    w = jax.random.normal(jax.random.key(1), (12, 4))
    q = orthonormal(w)
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(orthonormal(q), q, atol=1e-5)  # a fixed point: no drift under repeated use
    g = jax.grad(lambda w: orthonormal(w)[:, 0].sum())(w)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


def test_full_rank_interchange_is_patching_and_identity_edits(tiny):
    m, D = tiny, tiny.cfg.d_model
    base, src = np.array([[3, 9, 4, 7, 1, 12]]), np.array([[3, 9, 5, 8, 1, 12]])
    cache = models.forward(m, src, capture=("resid_post",)).acts["resid_post"]
    full = Interchange("resid_post", jax.random.normal(jax.random.key(2), (D, D)), cache, layers=(1,))
    patched = I.Replace("resid_post", cache, layers=(1,))
    np.testing.assert_allclose(models.forward(m, base, interventions=(full,)).logits,
                               models.forward(m, base, interventions=(patched,)).logits, atol=1e-4)
    clean = models.forward(m, base).logits
    hard = BoundlessInterchange("resid_post", jnp.eye(D), -50.0, cache, 0.1, layers=(1,))  # boundary below 0
    np.testing.assert_allclose(models.forward(m, base, interventions=(hard,)).logits, clean, atol=1e-5)
    reft = init_loreft("resid_post", D, 4, jax.random.key(3), layers=(1,))  # W = R, b = 0: the identity
    np.testing.assert_allclose(models.forward(m, base, interventions=(reft,)).logits, clean, atol=1e-5)
    moved = LoReFT("resid_post", reft.rotation, reft.W, jnp.ones(4), layers=(1,))
    assert float(jnp.abs(models.forward(m, base, interventions=(moved,)).logits - clean).max()) > 1e-3


def _planted_pairs(m, n=48, seed=0):
    """Pairs that differ in the token at position 2 and whose answers (argmax over two candidates) differ."""
    rng = np.random.default_rng(seed)
    cand = np.array([5, 6])
    base, src, labels = [], [], []
    while len(base) < n:
        b = rng.integers(1, 64, 7)
        s = b.copy()
        s[2] = rng.integers(1, 64)
        lb = np.asarray(models.forward(m, b[None]).logits)[0, -1, cand].argmax()
        ls = np.asarray(models.forward(m, s[None]).logits)[0, -1, cand].argmax()
        if lb != ls:
            base.append(b), src.append(s), labels.append(ls)
    ones = np.ones((n, 7), np.int32)
    return (np.array(base), ones), (np.array(src), ones), np.array(labels), cand


def test_das_grid_finds_the_planted_variable(tiny):
    """The counterfactual answer is what the source run answers: swapping the right subspace at the last
    position of the last layer carries it (IIA well above its null); at position 0, where base and source
    are the same, no subspace can (IIA 0). One compiled call trains all cells; the model is untouched."""
    m = tiny
    before = jax.tree.map(np.asarray, m.params)
    base, src, labels, cand = _planted_pairs(m)
    grid = das_grid(m, base, src, labels, cand, layers=(0, m.cfg.n_layers - 1), positions=(0, 2, -1), k=2,
                    steps=150, lr=0.05, n_random=16, seed=0)
    assert grid.shape == (2, 3) and grid.random.shape == (16, 2, 3) and grid.n_test == 12
    assert grid.values[1, 2] >= 0.9, grid.values  # last layer, last position
    assert grid.values[0, 0] == 0.0 and grid.values[1, 0] == 0.0  # position 0: identical in base and source
    assert grid.above_null()[1, 2] and not grid.above_null()[:, 0].any()
    b = grid.bases.reshape(-1, m.cfg.d_model, 2)
    np.testing.assert_allclose(np.einsum("cdk,cdj->ckj", b, b), np.broadcast_to(np.eye(2), (6, 2, 2)), atol=1e-5)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(m.params)))
    print(grid.table(3))


def test_das_grid_rejects_bad_input(tiny):
    base = (np.ones((4, 5), np.int32), np.ones((4, 5), np.int32))
    with pytest.raises(InputError, match="cf_labels must index candidates"):
        das_grid(tiny, base, base, np.array([0, 1, 2, 0]), [5, 6], layers=(0,), positions=(-1,))
    with pytest.raises(InputError, match="k must be"):
        das_grid(tiny, base, base, np.array([0, 1, 1, 0]), [5, 6], layers=(0,), positions=(-1,), k=0)
    with pytest.raises(InputError, match="layer 9"):
        das_grid(tiny, base, base, np.array([0, 1, 1, 0]), [5, 6], layers=(9,), positions=(-1,))
    with pytest.raises(InputError, match="das_grid: positions"):  # a cell no row has would train nothing
        das_grid(tiny, base, base, np.array([0, 1, 1, 0]), [5, 6], layers=(0,), positions=(7,))


def test_save_and_load_round_trip_and_refuse_another_model(tiny, tmp_path):
    D = tiny.cfg.d_model
    reft = init_loreft("resid_post", D, 4, jax.random.key(4), layers=(1,), positions=(-1,))
    steer = I.AddVector("resid_pre", np.arange(D, dtype=np.float32), scale=2.0, layers=(0, 2))
    das = Interchange("resid_mid", jax.random.normal(jax.random.key(5), (D, 3)), np.zeros((1, 6, D)), layers=(1,))
    for iv, name in ((reft, "reft"), (steer, "steer"), (das, "das")):
        back = load(save(iv, tmp_path / name, model=tiny), model=tiny)
        assert type(back) is type(iv) and back.site == iv.site and back.where == iv.where
        for a, b in zip(jax.tree.leaves(iv), jax.tree.leaves(back)):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    other = random_model(tiny_config("gpt2"), jax.random.key(0))
    with pytest.raises(InputError, match="made for another model: arch 'llama'"):
        load(tmp_path / "reft", model=other)
    with pytest.raises(InputError, match="not a saveable"):
        save(I.Function("resid_post", lambda v, c: v), tmp_path / "fn")


DAS_MESH = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from jax.sharding import Mesh
from models.testing import random_model, tiny_config
from interp.trainable import das_grid
from tests.interp.test_trainable import _planted_pairs
m = random_model(tiny_config("llama"), jax.random.key(0))
base, src, labels, cand = _planted_pairs(m)
kw = dict(layers=(0, 1, 2), positions=(0, -1), k=2, steps=40, lr=0.05, n_random=2, shuffled_control=True, seed=0)
one = das_grid(m, base, src, labels, cand, **kw)
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
split = das_grid(m, base, src, labels, cand, mesh=mesh, **kw)  # 6 cells over 4 devices: padded to 8
assert len(jax.devices()) == 8
np.testing.assert_array_equal(one.values, split.values)
np.testing.assert_array_equal(one.random, split.random)
np.testing.assert_array_equal(one.shuffled, split.shuffled)
np.testing.assert_allclose(one.bases, split.bases, atol=1e-5)
print("OK", one.values.tolist())
"""


def test_das_grid_on_a_mesh_equals_one_device():
    """`mesh=`: the grid's cells split over the mesh's data axis (6 cells on 4 devices, padded), the model and the
    pairs replicated: the IIA map, its controls and the trained bases equal the single-device run (8 simulated
    CPU devices, in their own process)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", DAS_MESH], capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
