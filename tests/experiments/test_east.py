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
    """Fields out of range fail when the Config is made (before a model loads), naming the flag; layers out of
    range for the model and the primary cell fail in `validate`."""
    for kwargs, flag in ((dict(betas=()), "--betas is empty"), (dict(window=11), "--window"),
                         (dict(temperatures=(0.0,)), "--temperatures"), (dict(betas=(0.5, float("nan"))), "--betas"),
                         (dict(n_episodes=0), "--n-episodes"), (dict(n_null=0), "--n-null"),
                         (dict(null_episodes=17), "--null-episodes"), (dict(sigma=float("inf")), "--sigma"),
                         (dict(alpha=1.0), "--alpha"), (dict(primary="layer3/beta2"), "--primary"),
                         (dict(primary="L15 b0.5"), "--primary"), (dict(layers=(10, 12), primary="layer15/beta0.5"),
                                                                    "--primary"), (dict(layers=(3, 3)), "--layers")):
        with pytest.raises(InputError, match=flag):
            east.Config(**kwargs)
    with pytest.raises(InputError, match="--layers"):
        east.validate(east.Config(layers=(15, 30)), 30)
    with pytest.raises(InputError, match="--primary"):  # layer 15 is not swept by a 18-layer model's default
        east.validate(east.Config(), 18)
    assert east.validate(east.Config(), 30) == ((10, 15, 20), "layer15/beta0.5")
    with pytest.raises(InputError, match="--primary"):  # before either model loads
        east.main(cfg=east.Config(second_model="gemma-3-270m"))
    assert east.validate(east.Config(primary="layermain/beta1"), 18) == ((6, 9, 12), "layer9/beta1")


@pytest.mark.parametrize("text, want", [
    (" A higher reward came from B, so press it. Action: B", "B"),  # the article "A" is not action A
    ("A.", "A"), ("A", "A"), (" B, because it paid more", "B"), ("B\nThought: more", "B"), (" **A**", "A"),
    ("Apples", None), ("A higher", None), (" AB", None), ("", None), ("I choose C. Action: C", None),
    (" B paid 12. Action: **A**", "A"), ("Action: A. Later: Action: B", "A"),  # the first explicit action wins
    ("Action: Apples", None), ("Action:B", "B"),
])
def test_parse_action(text, want):
    assert east.parse_action(text, ("A", "B")) == want


def test_parse_action_other_names():
    names = ("red", "blue")
    assert east.parse_action("Action: blue.", names) == "blue"
    assert east.parse_action("red, since", names) == "red"
    assert east.parse_action("redder is better", names) is None


def test_compare_paired_controls_and_null():
    """`compare` on hand-made per-episode entropies: a planted +0.1 over every control on every episode is found
    (paired interval around 0.1, exact sign-flip p = 2^-16) and lies above a null drawn below it; EAST equal to a
    control gives p = 1 and no cell passes the verdict."""
    cfg = east.Config(layers=(3,), betas=(0.5,), primary="layer3/beta0.5", n_null=16, null_episodes=4, n_boot=1000)
    rng = np.random.default_rng(0)
    names = ["unsteered", "EAST L3 beta 0.5"] + [f"{k} L3 beta 0.5" for k in east.CONTROLS]
    base = rng.uniform(0.3, 0.5, 16)
    final = np.stack([base, base + 0.1 + rng.uniform(0, 0.01, 16), base, base - 0.05, base + 0.02])
    null = base[:4] + rng.uniform(-0.05, 0.05, (16, 4))
    (c,) = east.compare(final, null, names, (3,), cfg)
    assert c["best_control"] == "step" and c["cell"] == "layer3/beta0.5"
    assert 0.08 <= c["vs_control"].lo < c["vs_control"].value < c["vs_control"].hi <= 0.1
    assert c["vs_control"].p == pytest.approx(2.0 ** -16) and c["vs_control"].n == 16
    assert c["null"].percentile == 100 and c["null"].p == pytest.approx(1 / 17)
    final[1] = final[4]
    (c,) = east.compare(final, null, names, (3,), cfg)
    assert c["vs_control"].value == 0 and c["vs_control"].p == 1.0


def test_prompt_pieces_rebuild_the_chat_prompt(smollm2):
    """`Prompt.text` (head + history pieces + tail) is the chat template rendered over the whole user message."""
    m, prompt = smollm2, east.Prompt()
    lines = ["Press 1: button A, reward 12", "Press 2: button B, reward -3"]
    intro = prompt.intro.format(a="A", b="B", n=4)
    for acts, rews, hist in (([], [], prompt.empty), ([0, 1], [12.4, -3.0], "\n".join(lines))):
        want = m.apply_chat_template([{"role": "user", "content": intro + "\n\n" + hist}]) + "Action:"
        assert prompt.text(m, True, 4, acts, rews) == want
    assert east.Prompt().text(m, False, 4, [0], [1.0]) == intro + "\n\nPress 1: button A, reward 1\n\nAction:"


@pytest.mark.slow
def test_cached_episodes_match_full_forward(smollm2):
    """Episodes advanced from per-row KV caches (a step runs only the newest history line and the tail) read the
    same policy and residual as `models.forward` over each whole prompt, steered or not, at any temperature;
    the last chunk is padded (11 rows: 3 chunks of 4, `chunk=5`). A second group (the steered condition on the first 2
    bandits, as a null draw plays them) reads the same as those episodes of the first group."""
    import models
    from interp.interventions import AddVector

    m, prompt = smollm2, east.Prompt()
    L, D = m.cfg.n_layers, m.cfg.d_model
    cfg = east.Config(steps=3, first_k=2, chunk=5)
    env = bandit.make_bandits(jax.random.PRNGKey(1), 3, cfg.steps)
    v = np.random.default_rng(2).normal(size=D).astype(np.float32)
    v /= np.linalg.norm(v)
    vectors = np.stack([np.zeros(D), v, np.zeros(D)]).astype(np.float32)
    scales = np.zeros((3, L), np.float32)
    scales[1, 5] = 20.0
    temps = np.array([1.0, 1.0, 2.0], np.float32)
    groups = [east.Group(vectors, scales, temps), east.Group(vectors[1:2], scales[1:2], temps[1:2], episodes=2)]
    res, sub = east.run_episodes(m, cfg, prompt, env, groups, jax.random.PRNGKey(3), (5, 9), True)
    assert sub["probs"].shape == (1, 2, 3, 2) and "texts" in res
    np.testing.assert_allclose(sub["probs"][0], res["probs"][1, :2], atol=1e-5)
    np.testing.assert_array_equal(sub["actions"][0], res["actions"][1, :2])
    ids = east.action_ids(m, prompt)
    assert res["z"].shape == (3, 2, 3, 3, D) and res["probs"].shape == (3, 3, 3, 2)
    for n in range(3):
        texts = [prompt.text(m, True, cfg.steps, res["actions"][n, e, :t], res["rewards"][n, e, :t])
                 for e in range(3) for t in range(cfg.steps)]
        steer = (AddVector("resid_post", v, 20.0, layers=(5,), positions=(-1,)),) if n == 1 else ()
        logits, acts = models.forward(m, texts, capture=("resid_post",), interventions=steer)
        want = np.asarray(jax.nn.softmax(logits[:, -1][:, ids] / temps[n], -1)).reshape(3, cfg.steps, 2)
        np.testing.assert_allclose(res["probs"][n], want, atol=1e-4)
        for i, l in enumerate((5, 9)):
            z = np.asarray(acts["resid_post"][l, :, -1]).reshape(3, cfg.steps, D)
            np.testing.assert_allclose(res["z"][n, i], z, atol=1e-3, rtol=1e-4)
    assert not np.allclose(res["probs"][1], res["probs"][0], atol=1e-3)  # the steering changed the policy
    # rewards follow the chosen arms on the shared noise
    a = res["actions"]
    e = np.arange(3)[None, :, None]
    t = np.arange(cfg.steps)[None, None]
    want = np.asarray(env.means)[e, a] + env.sigma * np.asarray(env.noise)[e, t, a]
    np.testing.assert_allclose(res["rewards"], want, rtol=1e-6)


@pytest.mark.slow
def test_smoke_tiny_run(tmp_path, tiny_smollm2):
    cfg = east.Config(model=tiny_smollm2, steps=3, n_collect=2, n_episodes=2, layers=(1, 3), betas=(2.0,), temperatures=(2.0,), window=2,
                      first_k=2, sampled_prompts=2, samples=2, max_new_tokens=6, n_null=3, null_episodes=1,
                      primary="layer3/beta2", n_boot=200, out=str(tmp_path))
    out, metrics = east.main(cfg=cfg)
    met = json.loads((out / "metrics.json").read_text())[tiny_smollm2]
    conds = met["conditions"]
    assert len(conds) == 1 + 2 + 2 * 3 + 1  # unsteered, EAST at 2 layers, 3 controls at each, 1 temperature
    cmp = met["east_vs_controls"]
    assert {(c["layer"], c["best_control"] in east.CONTROLS) for c in cmp} == {(1, True), (3, True)}
    for c in cmp:
        assert c["vs_control"]["n"] == 2 and c["vs_control"]["lo"] <= c["vs_control"]["value"] <= c["vs_control"]["hi"]
        assert c["null"]["k"] == 3 and 0 <= c["null"]["percentile"] <= 100 and c["holm_p"] >= c["vs_control"]["p"]
    assert met["primary"] == "layer3/beta2" and isinstance(met["verdict"]["holds"], bool)
    for c in conds.values():
        assert 0 <= c["final_entropy"] <= np.log(2) + 1e-6 and 0 <= c["tried_both"] <= 1
    assert len(met["sampled"]) == 3 and all(0 <= s["valid_lo"] <= s["valid_rate"] <= s["valid_hi"] <= 1
                                            for s in met["sampled"])
    assert (out / "east_sweep.png").exists() and (out / "east_entropy_per_step.png").exists()
    report = (out / "report.md").read_text()
    assert "transfer to a reworded prompt" in report and "Primary comparison, named before the run" in report
    assert "Claims" in report and len(met["claims"]) >= 8
    assert "smallest attainable null p is 1/(K+1) = 0.250" in report  # K = 3 cannot reject at 0.05: said so
