"""Guiding Giants: per-example, per-layer steering (`AddVectorPerExample`), the controller and its training, and a
smoke run of `experiments.guiding_giants` at tiny sizes (real SmolLM2)."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from interp.interventions import AddVector, AddVectorPerExample, Where
from interp.testing import random_model
from models.errors import InputError
from models.generate import generate_tokens
from models.transformer import Capture

CFG = models.Config(arch="llama", vocab_size=40, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=48,
                    n_ctx=64)


@pytest.fixture(scope="module")
def tiny():
    m = random_model(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, CFG.vocab_size)
    mask = jnp.asarray([[1] * 9, [0, 0] + [1] * 7, [0] * 4 + [1] * 5])  # left-padded rows
    scale = jax.random.normal(jax.random.key(2), (3, CFG.n_layers)) * 2
    vec = jax.random.normal(jax.random.key(3), (3, CFG.d_model))
    return m, tokens, mask, scale, vec


def test_per_example_scale_is_each_row_with_its_own_per_layer_addvector(tiny):
    m, t, k, scale, vec = tiny
    real = np.asarray(k, bool)
    for vector in (vec[0], vec):  # one vector for every row, or one per row
        got, _ = models.forward(m, t, k, interventions=(AddVectorPerExample("resid_post", vector, scale),))
        for b in range(3):
            v = vector if vector.ndim == 1 else vector[b]
            ref, _ = models.forward(m, t[b:b + 1], k[b:b + 1], interventions=(AddVector("resid_post", v, scale[b]),))
            np.testing.assert_allclose(np.asarray(got[b])[real[b]], np.asarray(ref[0])[real[b]], atol=2e-5)
    plain, _ = models.forward(m, t, k)
    assert float(jnp.abs(got - plain).max()) > 1e-2  # the steering changes the logits


def test_layer_zero_edit_is_the_hand_computed_addition(tiny):
    m, t, k, scale, vec = tiny
    cap = (Capture("resid_post", layers=(0,)),)
    _, base = models.forward(m, t, k, capture=cap)
    _, steered = models.forward(m, t, k, capture=cap,
                                interventions=(AddVectorPerExample("resid_post", vec, scale, layers=(0,)),))
    want = base["resid_post"][0] + scale[:, 0, None, None] * vec[:, None, :]
    np.testing.assert_allclose(np.asarray(steered["resid_post"][0]), np.asarray(want), atol=1e-5)


def test_generation_last_layer_newest_token_matches_rows_alone(tiny):
    m, t, k, scale, vec = tiny
    L, stops, key = CFG.n_layers, jnp.zeros((0,), jnp.int32), jax.random.key(0)
    where = Where(layers=(L - 1,), positions=(-1,))
    big = scale * 8
    got = generate_tokens(m, t, k, key, (AddVectorPerExample("resid_post", vec[0], big, where=where),), stops,
                          max_new_tokens=5)
    for b in range(3):
        ref = generate_tokens(m, t[b:b + 1], k[b:b + 1], key,
                              (AddVector("resid_post", vec[0], big[b, L - 1], where=where),), stops, max_new_tokens=5)
        np.testing.assert_array_equal(np.asarray(got[b]), np.asarray(ref[0]))
    plain = generate_tokens(m, t, k, key, (), stops, max_new_tokens=5)
    assert (np.asarray(plain) != np.asarray(got)).any()


def test_per_example_shapes_are_checked(tiny):
    m, t, k, scale, vec = tiny
    with pytest.raises(InputError, match="3 layers"):
        models.forward(m, t, k, interventions=(AddVectorPerExample("resid_post", vec[0], jnp.ones((3, 4))),))
    with pytest.raises(InputError, match="3 rows"):
        models.forward(m, t, k, interventions=(AddVectorPerExample("resid_post", vec[0], jnp.ones((2, 3))),))
    with pytest.raises(InputError, match="3 rows"):
        models.forward(m, t, k, interventions=(AddVectorPerExample("resid_post", vec[:2], scale),))
    with pytest.raises(InputError, match="batch, n_layers"):
        AddVectorPerExample("resid_post", vec[0], jnp.ones(3))
    with pytest.raises(InputError, match="not a layer site"):
        AddVectorPerExample("embed", vec[0], scale)


def test_authors_mode_prompt_pass_is_exact_from_the_cached_residual(tiny):
    from experiments.gg_controller import last_layer_logp, prompt_pass

    m, t, k, scale, vec = tiny
    L, t, k = CFG.n_layers, np.asarray(t), np.asarray(k)
    feats, base = prompt_pass(m, t, k, 2, 2)  # 3 rows in chunks of 2: the last chunk wraps round
    assert feats.shape == (3, 2 * CFG.d_model) and base.shape == (3, CFG.vocab_size)
    where = Where(layers=(L - 1,), positions=(-1,))
    _, steered = prompt_pass(m, t, k, 2, 2, lambda r: (AddVectorPerExample("resid_post", vec[0], scale[r], where=where),))
    got = last_layer_logp(m, feats[:, -CFG.d_model:], scale[:, L - 1], vec[0])
    np.testing.assert_allclose(np.asarray(got), steered, atol=1e-5)
    assert np.abs(steered - base).max() > 1e-2


def test_controller_learns_labels_and_checkpoint_restores(tmp_path):
    from experiments.gg_controller import Controller, TrainSpec, optimizer, bce_loss, restore, train_controller

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(16), np.zeros(16)]
    x = rng.normal(size=(32, 12)) + 2.0 * y[:, None]  # separable classes
    spec = TrainSpec(n_hidden=16, lr=1e-2, epochs=6)
    ctrl, losses = train_controller(x, y, 5, spec, jax.random.key(0), tmp_path / "ckpt")
    s, w = ctrl(jnp.asarray(x))
    assert losses[-1] < losses[0] and s.shape == (32,) and w.shape == (32, 5)
    assert (np.asarray(s)[y > 0].min() > np.asarray(s)[y == 0].max())
    again, _ = train_controller(x, y, 5, spec, jax.random.key(0))  # seeded: the same controller
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ctrl), jax.tree.leaves(again)))
    init = Controller(12, 16, 5, jax.random.key(1))
    like = (init, optimizer(spec).init(eqx.filter(init, eqx.is_array)))
    (got, _), meta = restore(tmp_path / "ckpt", like)
    assert meta["kind"] == "bce" and all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ctrl)))
    # the regulariser is the only gradient on the layer weights: with reg = 0 the w rows get none
    g = jax.grad(lambda c: bce_loss(c, jnp.asarray(x), jnp.asarray(y), 0.0))(ctrl)
    assert float(jnp.abs(g.out.weight[1:]).max()) == 0.0 and float(jnp.abs(g.out.weight[0]).max()) > 0


@pytest.mark.slow
def test_guiding_giants_smoke(tmp_path):
    from experiments.guiding_giants import Config, main

    cfg = Config(n_train=8, n_val=4, n_test=2, hidden=16, epochs=2, alphas=(16.0,), arditi_layer_stride=15,
                 e2e_steps=2, batch=4, max_new_tokens=3, batch_size=8, out=str(tmp_path))
    out, metrics = main(cfg=cfg)
    for f in ("report.md", "metrics.json", "selectivity.png", "layer_weights.png"):
        assert (out / f).exists(), f
    for name in ("bce", "label_shuffled", "end_to_end_phrase", "end_to_end_arditi"):
        assert (out / "checkpoints" / name).is_dir(), name
    saved = json.loads((out / "metrics.json").read_text())
    rows = saved["conditions"]
    # none + paper (4 kinds x 2 directions + random) + authors (3 kinds x 2 directions + random)
    assert len(rows) == 1 + 9 + 7
    for r in rows.values():
        assert 0 <= r["refusal_rate_harmful"] <= 1 and np.isfinite(r["refusal_score strongreject harmful"])
        assert r["kl harmbench harmless"] >= -1e-5
    assert rows["none"]["kl harmbench harmless"] == pytest.approx(0.0, abs=1e-5)
    assert set(saved["auroc"]) == {"controller", "label-shuffled"}  # end to end with the BCE controller's s
    assert len(saved["end_to_end_objective"]["arditi"]) == 2
