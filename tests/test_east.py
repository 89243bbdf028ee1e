"""EAST (experiments.east, experiments.bandit): the bandit, entropy and vectors against hand computations; a smoke
run of the whole study on tiny sizes."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bandit, east
from models.errors import InputError


def test_bandit_rewards_regret_and_tried_both_by_hand():
    env = bandit.make_bandits(jax.random.PRNGKey(3), n=4, steps=5, gap=5.0, sigma=10.0)
    means = np.asarray(env.means)
    assert sorted(np.unique(means).tolist()) == [10.0, 15.0] and (means.max(1) - means.min(1) == 5).all()
    a = jnp.asarray([0, 1, 1, 0])
    r = np.asarray(bandit.pull(env, a, 2))
    want = [means[e, int(a[e])] + 10.0 * float(env.noise[e, 2, int(a[e])]) for e in range(4)]
    np.testing.assert_allclose(r, want, rtol=1e-6)
    acts = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0], [1, 0, 0, 0, 0]])
    reg = np.asarray(bandit.regret(env, jnp.asarray(acts)))
    hand = np.cumsum([[means[e].max() - means[e, x] for x in acts[e]] for e in range(4)], 1)
    np.testing.assert_allclose(reg, hand)
    np.testing.assert_array_equal(np.asarray(bandit.tried_both(jnp.asarray(acts), 2)), [0, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(bandit.tried_both(jnp.asarray(acts), 3)), [1, 0, 1, 1])
    with pytest.raises(InputError, match="k=6"):
        bandit.tried_both(jnp.asarray(acts), 6)


def test_same_seed_same_bandits():
    a, b = (bandit.make_bandits(jax.random.PRNGKey(0), 3, 4) for _ in range(2))
    np.testing.assert_array_equal(a.noise, b.noise)
    np.testing.assert_array_equal(a.means, b.means)


def test_entropy_by_hand():
    p = np.array([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]])
    want = [np.log(2), 0.0, -(0.9 * np.log(0.9) + 0.1 * np.log(0.1))]
    np.testing.assert_allclose(np.asarray(bandit.entropy(p)), want, rtol=1e-6)


def test_east_and_step_vectors_by_hand():
    rng = np.random.default_rng(0)
    z, h = rng.normal(size=(2, 3, 4)), rng.uniform(size=(2, 3))
    num = np.zeros(4)
    for k in range(2):
        zbar = z[k].mean(0)
        for t in range(3):
            num += h[k, t] * (z[k, t] - zbar)
    np.testing.assert_allclose(np.asarray(bandit.east_vector(z, h)), num / h.sum(), rtol=1e-5, atol=1e-6)
    # step index: weights tbar - t = (1, 0, -1), normalised by sum |w| = 2 per episode
    step = sum((z[k, 0] - z[k].mean(0)) - (z[k, 2] - z[k].mean(0)) for k in range(2)) / 4
    np.testing.assert_allclose(np.asarray(bandit.step_index_vector(z)), step, rtol=1e-5, atol=1e-6)
    # a constant entropy gives the zero vector (every episode is centred)
    np.testing.assert_allclose(np.asarray(bandit.east_vector(z, np.ones((2, 3)))), 0, atol=1e-6)
    with pytest.raises(InputError, match="every entropy is 0"):
        bandit.east_vector(z, np.zeros((2, 3)))


def test_config_validation_names_the_flag():
    cfg = east.Config()
    with pytest.raises(InputError, match="--layers"):
        east.validate(east.Config(layers=(30,)), 30)
    with pytest.raises(InputError, match="--betas is empty"):
        east.validate(east.Config(betas=()), 30)
    with pytest.raises(InputError, match="--window"):
        east.validate(east.Config(window=11), 30)
    with pytest.raises(InputError, match="--temperatures"):
        east.validate(east.Config(temperatures=(0.0,)), 30)
    assert east.validate(cfg, 30) == (10, 15, 20)


@pytest.mark.slow
def test_exact_readout_matches_forward(smollm2):
    """The step program's action logits and captured residual equal a plain `models.forward` at the last token."""
    import models

    m, prompt, L, D = smollm2, east.Prompt(), smollm2.cfg.n_layers, smollm2.cfg.d_model
    texts = [prompt.text(m, True, 4, [], []), prompt.text(m, True, 4, [0, 1], [12.4, -3.0])]
    ids = east.action_ids(m, prompt)
    tok, mask = east._pad(*m.tokenize(texts))
    logits, z = east._step(m, jnp.asarray(tok)[None], jnp.asarray(mask)[None], jnp.zeros((1, L, D)), jnp.zeros((1, L)),
                           jnp.asarray(ids), (5,), 1)
    ref, acts = models.forward(m, texts, capture=("resid_post",))
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(ref[:, -1][:, ids]), atol=2e-3)
    np.testing.assert_allclose(np.asarray(z[0, 0]), np.asarray(acts["resid_post"][5, :, -1]), atol=2e-3)
    # steering at layer 5 only changes the result there and is the vector added at the last token
    v = np.zeros((1, L, D), np.float32)
    v[0, 5, 0] = 1.0
    _, z2 = east._step(m, jnp.asarray(tok)[None], jnp.asarray(mask)[None], jnp.asarray(v), jnp.asarray(3.0 * (np.arange(L) == 5))[None],
                       jnp.asarray(ids), (5,), 1)
    np.testing.assert_allclose(np.asarray(z2 - z)[0, 0, :, 0], 3.0, atol=2e-3)


@pytest.mark.slow
def test_smoke_tiny_run(tmp_path):
    cfg = east.Config(steps=3, n_collect=2, n_episodes=2, layers=(10, 15), betas=(2.0,), temperatures=(2.0,), window=2,
                      first_k=2, sampled_prompts=2, samples=2, max_new_tokens=6, out=str(tmp_path))
    out, metrics = east.main(cfg=cfg)
    met = json.loads((out / "metrics.json").read_text())["smollm2-135m-instruct"]
    conds = met["conditions"]
    assert len(conds) == 1 + 2 + 3 + 1  # unsteered, EAST at 2 layers, 3 controls, 1 temperature
    for c in conds.values():
        assert 0 <= c["final_entropy"] <= np.log(2) + 1e-6 and 0 <= c["tried_both"] <= 1
    assert len(met["sampled"]) == 3 and all(0 <= s["valid_rate"] <= 1 for s in met["sampled"])
    assert (out / "east_sweep.png").exists() and (out / "east_entropy_per_step.png").exists()
    assert "transfer to a reworded prompt" in (out / "report.md").read_text()
