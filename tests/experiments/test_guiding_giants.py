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
from models.testing import random_model, tiny_config
from models.errors import InputError
from models.generate import generate_tokens
from models.transformer import Capture

CFG = tiny_config("llama", vocab_size=40)


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


def _step_steer(coef, bias, gate, key=jax.random.key(5)):
    from experiments.gg_controller import Controller, StepSteer

    ctrl = Controller(2 * CFG.d_model, 8, CFG.n_layers, key)
    f = lambda x: jnp.asarray(x, jnp.float32)
    return StepSteer(ctrl, f(coef), f(bias), f(gate))


def test_per_step_controller_equals_a_loop_of_full_forwards_and_starts_at_the_prompt_scale(tiny):
    """The controller re-run at every forward (the authors' SteeringModifier in their mode) gives the greedy tokens
    of a Python loop of whole forwards (controller on the newest token's last-2-layer resid_post, push added to the
    last layer's output there), and its step-0 scale is the once-per-prompt scale from `prompt_pass`."""
    from experiments.gg_controller import StepSteer, per_step_tokens, prompt_pass
    from interp.readout import logits_from_resid

    m, t, k, _, vec = tiny
    n_new, layers = 6, (CFG.n_layers - 2, CFG.n_layers - 1)
    d = vec[0] / jnp.linalg.norm(vec[0])
    steer = _step_steer([6.0, 6.0, 0.0], [0.0, 1.0, 4.0], [0.0, 1.0, 0.0])  # controller, gate-only, fixed scale
    stops = jnp.zeros((0,), jnp.int32)
    got, scales = per_step_tokens(m, t, k, steer, d, stops, layers=layers, max_new_tokens=n_new)
    got, scales = np.asarray(got), np.asarray(scales)
    cap = (Capture("resid_post", layers=layers, positions=(-1,)),)
    for b in range(3):
        row = StepSteer(steer.ctrl, steer.coef[b:b + 1], steer.bias[b:b + 1], steer.gate[b:b + 1])
        seq = list(np.asarray(t[b])[np.asarray(k[b], bool)])
        for i in range(n_new):
            _, acts = models.forward(m, jnp.asarray([seq]), capture=cap)
            feats = jnp.moveaxis(acts["resid_post"][:, :, 0], 0, 1).reshape(1, -1)
            c = row.scale(feats)
            np.testing.assert_allclose(float(c[0]), scales[b, i], rtol=1e-4, atol=1e-4)
            seq.append(int(jnp.argmax(logits_from_resid(m.params, m.cfg, acts["resid_post"][-1, :, 0] + c[:, None] * d))))
        np.testing.assert_array_equal(got[b], seq[-n_new:])
    feats, _ = prompt_pass(m, np.asarray(t), np.asarray(k), 2, 3)
    np.testing.assert_allclose(np.asarray(steer.scale(jnp.asarray(feats))), scales[:, 0], rtol=1e-5, atol=1e-5)
    assert scales[2].std() == 0 and scales[0].std() > 0  # a fixed scale stays; the controller's moves per step
    plain, _ = per_step_tokens(m, t, k, _step_steer([0.0] * 3, [0.0] * 3, [0.0] * 3), d, stops, layers=layers,
                               max_new_tokens=n_new)
    ref = generate_tokens(m, t, k, jax.random.key(0), (), stops, max_new_tokens=n_new)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(ref))  # zero scale: plain greedy generation
    assert (np.asarray(plain) != got).any()


def test_gate_only_never_pushes_negative_and_top_token_is_the_unembedding_argmax(tiny):
    from experiments.gg_controller import top_pushed_token, token_direction

    m, *_ = tiny
    x = jax.random.normal(jax.random.key(7), (16, 2 * CFG.d_model)) * 3
    free = _step_steer(np.ones(16), np.zeros(16), np.zeros(16)).scale(x)
    gated = _step_steer(np.ones(16), np.zeros(16), np.ones(16)).scale(x)
    assert (np.asarray(gated) >= 0).all() and (np.asarray(free) < 0).any()
    np.testing.assert_allclose(np.asarray(gated), np.maximum(np.asarray(free), 0), atol=1e-6)
    d = jax.random.normal(jax.random.key(8), (CFG.d_model,))
    want = int(np.argmax(np.asarray(m.params["embed"]["W_E"]) @ np.asarray(d)))  # tied unembedding
    assert top_pushed_token(m, d) == want
    np.testing.assert_allclose(float(jnp.linalg.norm(token_direction(m, want))), 1.0, atol=1e-6)


@pytest.mark.parametrize("kw,field", [(dict(epochs=-1), "epochs"), (dict(n_null=0), "n_null"),
                                      (dict(paper_fractions=(float("nan"),)), "paper_fractions"),
                                      (dict(authors_fractions=()), "authors_fractions"), (dict(lr=float("nan")), "lr"),
                                      (dict(primary="paper@3"), "primary"), (dict(primary="authors"), "primary"),
                                      (dict(directions=("arditi",)), "directions"), (dict(kl_bound=0.0), "kl_bound"),
                                      (dict(e2e_steps=2, e2e_fraction=0.5), "e2e_fraction"), (dict(alpha=1.0), "alpha"),
                                      (dict(max_new_tokens=0), "max_new_tokens"), (dict(n_test=-2), "n_test")])
def test_config_rejects_bad_values_naming_the_field(kw, field):
    from experiments.guiding_giants import Config

    with pytest.raises(InputError, match=field):
        Config(**kw)


def test_cli_fails_on_a_bad_flag_before_loading_a_model(capsys):
    from experiments.guiding_giants import main

    with pytest.raises(SystemExit):
        main(["--epochs", "-1", "--model", "no-such-model-should-not-load"])
    assert "epochs" in capsys.readouterr().err


@pytest.mark.slow
def test_guiding_giants_smoke(tmp_path, tiny_smollm2):
    from experiments.guiding_giants import Config, cell_name, main

    cfg = Config(model=tiny_smollm2, n_train=8, n_val=4, n_test=2, hidden=16, epochs=2, authors_fractions=(1.0,),
                 paper_fractions=(0.05,), primary="authors@1", n_null=2, null_prompts=1, arditi_layer_stride=3, kl_grid=(0.1,), e2e_steps=2, e2e_fraction=0.05, batch=4,
                 max_new_tokens=4, batch_size=8, out=str(tmp_path))
    out, metrics = main(cfg=cfg)
    for f in ("report.md", "metrics.json", "selectivity.png", "generations.json"):
        assert (out / f).exists(), f
    for name in ("bce", "label_shuffled", "end_to_end_authors"):
        assert (out / "checkpoints" / name).is_dir(), name
    saved = json.loads((out / "metrics.json").read_text())
    cells = saved["cells"]
    # none; authors' mode: controller x 3 directions, token-push x 2 phrase directions, once-per-prompt, constant,
    # gate-only, label-shuffled, 2 random draws; paper mode: the authors' direction's controller, token-push,
    # constant, label-shuffled, gate-only, end to end, 2 random draws
    assert len(cells) == 1 + (3 + 2 + 4 + 2) + (6 + 2)
    for name, c in cells.items():
        n = 1 if "random #" in name else 4  # 2 HarmBench + 2 StrongREJECT per class; a random draw: null_prompts
        assert c["n_harmful"] == c["n_harmless"] == n, name
        assert 0 <= c["refused_harmful"] + c["degenerate_harmful"] <= 4 and c["kl_harmless"] >= -1e-5
    assert cells["none"]["kl_harmless"] == pytest.approx(0.0, abs=1e-5)
    assert cells[cell_name("paper", 0.05, "constant", "authors")]["kl_harmless"] > 0
    assert saved["verdict"]["primary"] == cell_name("authors", 1.0, "controller", "authors")
    assert set(saved["verdict"]["holm"]) == {cell_name("authors", 1.0, "controller", "authors"),
                                             cell_name("paper", 0.05, "controller", "authors")}
    report = (out / "report.md").read_text()
    assert "## Claims" in report and "## Verdict" in report
    assert len(saved["end_to_end_objective"]) == 2
