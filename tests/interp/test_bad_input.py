"""No silent wrong answers: every concrete index is checked, "position" means one thing, metric targets are one
token, NextTokenLoss works with the sweeps' defaults, interventions differentiate with jax.grad, sweep defaults."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from interp import interventions as I
from interp import lens, progress, sweeps
from interp.readout import LogitDiff, NextTokenLoss, TokenLogProb, run_readout
from models.testing import random_model, tiny_config
from models.checks import check_call
from models.errors import InputError

CFG = tiny_config("llama", vocab_size=40)
LENGTHS = (9, 7, 5)


@pytest.fixture(scope="module")
def tiny():
    m = random_model(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, CFG.vocab_size)
    mask = jnp.asarray([[0] * (9 - n) + [1] * n for n in LENGTHS])  # left-padded rows
    return m, tokens, mask


def raises(fn, *words):
    """`fn()` raises InputError whose message contains every word."""
    with pytest.raises(InputError) as e:
        fn()
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    return str(e.value)


def fwd(m, t, k, ivs=(), capture=()):
    return models.forward(m, t, k, capture=capture, interventions=tuple(ivs))


# ----------------------------------------------------------------------------- concrete indices


def test_capture_layers_positions_and_token_ids_are_checked(tiny):
    m, t, k = tiny
    raises(lambda: fwd(m, t, k, capture=(models.Capture("resid_post", layers=(40,)),)), "layers=(40,)", "0..2")
    resumed = lambda layers: models.transformer.forward(m.params, CFG, t, k, capture=(models.Capture(
        "resid_post", layers=layers),), start_layer=1, resid=jnp.zeros((3, 9, CFG.d_model)))
    assert resumed((1, 2))[1]["resid_post"].shape[0] == 2
    raises(lambda: resumed((0,)), "layer 0", "1..2")  # not run by a forward resumed at layer 1
    # position 5 exists in rows of 9 and 7 real tokens but not in the row of 5: never a pad or a NaN
    raises(lambda: fwd(m, t, k, capture=(models.Capture("resid_post", positions=(5,)),)), "positions=(5,)", "-5..4")
    raises(lambda: fwd(m, t, k, capture=(models.Capture("resid_post", positions=(-6,)),)), "-5..4")
    raises(lambda: fwd(m, t, k, capture=(models.Capture("resid_post", seq_indices=(9,)),)), "seq_indices=(9,)", "-9..8")
    raises(lambda: fwd(m, t.at[1, 3].set(CFG.vocab_size), k), "token id 40", "0..39")
    raises(lambda: fwd(m, t.at[1, 3].set(-1), k), "token id -1")
    # the pure forward checks eagerly too; the readouts and lenses name their own argument
    raises(lambda: models.transformer.forward(m.params, CFG, t.at[0, 0].set(99), k), "token id 99")
    raises(lambda: run_readout(m, t, k, positions=(7,)), "positions=(7,)")
    raises(lambda: lens.logit_lens(m, t, k, positions=(5,)), "positions=(5,)", "-5..4")
    raises(lambda: lens.direct_logit_attribution(m, t, k, lens.unembed_direction(m, 3), position=-6), "-5..4")
    raises(lambda: lens.unembed_direction(m, 41), "token id 41")


def test_traced_values_fill_nan_never_a_neighbour(tiny):
    """Inside a caller's jit the mask and token ids are traced: the documented fill is NaN, not a clamp."""
    m, t, k = tiny
    cap = (models.Capture("resid_post", positions=(5,)),)
    acts = jax.jit(lambda t, k: models.transformer.forward(m.params, CFG, t, k, capture=cap)[1])(t, k)["resid_post"]
    ok = np.isfinite(np.asarray(acts)).all(-1)  # [L, B, 1]
    assert ok[:, :2].all() and not ok[:, 2].any()  # the row of 5 real tokens has no position 5
    logits = jax.jit(lambda t: models.transformer.forward(m.params, CFG, t, k)[0])(t.at[0, 8].set(CFG.vocab_size))
    assert np.isnan(np.asarray(logits[0, 8])).all() and np.isfinite(np.asarray(logits[1:])).all()


# ----------------------------------------------------------------------------- selections that match nothing


def test_interventions_are_validated_against_the_model(tiny):
    m, t, k = tiny
    v = jnp.ones(CFG.d_model)
    raises(lambda: fwd(m, t, k, [I.AddVector("resid_pre", v, layers=(40,))]), "AddVector('resid_pre')", "layers=(40,)",
           "0..2")
    raises(lambda: fwd(m, t, k, [I.AddVector("resid_pre", v, positions=(6,))]), "positions=(6,)", "-5..4")
    raises(lambda: I.zero_heads(CFG, [(1, 12)]), "head", "12", "0..3")
    raises(lambda: I.zero_heads(CFG, [(3, 0)]), "layer", "0..2")
    raises(lambda: fwd(m, t, k, [I.zero_ablation("attn.z", heads=np.ones(9, bool))]), "heads", "[4]")
    raises(lambda: fwd(m, t, k, [I.zero_ablation("attn.k", heads=np.ones(4, bool))]), "heads", "[2]")  # kv heads
    raises(lambda: fwd(m, t, k, [I.zero_ablation("attn.z", heads=np.zeros(4, bool))]), "selects nothing")
    raises(lambda: fwd(m, t, k, [I.ScaleHeads(np.ones((5, 4)))]), "mask", "3 layers")
    raises(lambda: fwd(m, t, k, [I.AddVector("resid_pre", jnp.ones((2, 32)), per_layer=True)]), "vector", "3 layers")
    raises(lambda: fwd(m, t, k, [I.zero_ablation("resid_pre", tokens=np.ones(8, bool))]), "tokens", "[9]")
    raises(lambda: fwd(m, t, k, [I.patch("resid_pre", jnp.zeros((3, 3, 8, 32)))]), "8 positions", "9")
    # stacked selections are checked item by item in the sweeps
    bad = I.stack([I.Where(layers=(0,)), I.Where(layers=(7,))])
    raises(lambda: sweeps.sweep(m, t, k, LogitDiff(1, 2), (I.zero_ablation("attn.z"),), where=bad), "layers", "0..2")
    raises(lambda: sweeps.sweep(m, t, k, LogitDiff(1, 2), (I.zero_ablation("attn.z"),), where=I.Where(layers=(0,))),
           "StackedWhere")


def test_generation_positions_are_checked_with_the_tokens_it_adds(tiny):
    """`models.generate` checks the prompt batch with `new_tokens`: a decode step only edits its newest token."""
    m, t, k = tiny
    v = jnp.ones(CFG.d_model)
    gen = lambda **kw: check_call(CFG, t, k, (), (I.AddVector("resid_pre", v, **kw),), new_tokens=8)
    gen(positions=(-1,), steps="generated")  # each newest token
    gen(positions=(10,), steps="generated")  # generated in every row (rows of 9, 7, 5 prompt tokens, 8 new)
    gen(positions=(10,))
    raises(lambda: gen(positions=(7,), steps="generated"), "7", "selects nothing")  # a prompt token of row 0
    raises(lambda: gen(positions=(-2,), steps="generated"), "-2", "selects nothing")
    raises(lambda: gen(positions=(30,)), "30", "selects nothing")
    raises(lambda: gen(tokens=np.ones(9, bool), steps="generated"), "tokens=", "selects nothing")


# ----------------------------------------------------------------------------- one meaning of "position"


def test_position_means_the_same_everywhere_on_a_padded_batch(tiny):
    """Position p = the p-th real token of each row (-1 = its last): Capture, Where and the readouts agree, for
    left and right padding, and match the explicit sequence-index / position-id spellings."""
    m, t, _ = tiny
    v = jax.random.normal(jax.random.key(2), (CFG.d_model,))
    read = jax.jit(lambda t, k: run_readout(m, t, k, positions=(-1,)).logits[:, 0])
    alone = jax.jit(lambda row: models.forward(m, row)[0][0, -1])
    for pad in ("left", "right"):
        k = jnp.asarray([[0] * (9 - n) + [1] * n if pad == "left" else [1] * n + [0] * (9 - n) for n in LENGTHS])
        rows = np.arange(3)
        first = np.argmax(np.asarray(k), 1)
        last = first + np.asarray(LENGTHS) - 1
        _, every = fwd(m, t, k, capture=("resid_pre", "resid_post"))
        idx = tuple(sorted({*first.tolist(), *(first + 2).tolist(), *last.tolist()}))
        _, got = fwd(m, t, k, capture=(models.Capture("resid_post", positions=(0, 2, -1)),
                                       models.Capture("resid_pre", seq_indices=idx)))
        for j, seq in enumerate((first, first + 2, last)):  # against sequence indices, row by row
            want = every["resid_post"][:, rows, seq]
            np.testing.assert_array_equal(np.asarray(got["resid_post"][:, :, j]), np.asarray(want))
            by_index = got["resid_pre"][:, rows, np.searchsorted(idx, seq)]
            np.testing.assert_array_equal(np.asarray(by_index), np.asarray(every["resid_pre"][:, rows, seq]))
        # Where(positions=) edits what Capture(positions=) reads; = a tokens mask at each row's last index,
        # = position_ids= for p >= 0
        onehot = np.zeros((3, 9), bool)
        onehot[rows, last] = True
        edit = lambda **kw: fwd(m, t, k, [I.AddVector("resid_pre", v, layers=(1,), **kw)], ("resid_pre",))[1]["resid_pre"]
        a = edit(positions=(-1,))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(edit(tokens=onehot)))
        diff = np.asarray(a[1] - every["resid_pre"][1])
        np.testing.assert_allclose(diff[rows, last], np.broadcast_to(v, (3, CFG.d_model)), atol=1e-5)
        assert np.all(diff[~onehot] == 0)
        np.testing.assert_array_equal(np.asarray(edit(positions=(2,))), np.asarray(edit(position_ids=(2,))))
        # the readout at -1 is each row's last real token: what the row gives alone
        r = read(t, k)
        for b in rows:
            np.testing.assert_allclose(np.asarray(r[b]), np.asarray(alone(t[b:b + 1, first[b]:last[b] + 1])), atol=1e-4)


# ----------------------------------------------------------------------------- metric targets


def test_metric_targets_are_one_token(tiny):
    m, t, k = tiny
    raises(lambda: LogitDiff([5, 6], 7), "LogitDiff correct", "[5, 6]", "to_single_token")
    raises(lambda: LogitDiff(5, [2, 6]), "LogitDiff wrong")  # e.g. an encode() with BOS first
    raises(lambda: TokenLogProb([2, 6]), "TokenLogProb ids", "2 token ids")
    raises(lambda: LogitDiff(np.ones((3, 2), int), 7), "shape (3, 2)")
    raises(lambda: LogitDiff(jnp.asarray([1, 2]), 7)(run_readout(m, t, k)), "2 per-row ids", "3 rows")
    raises(lambda: sweeps.baseline(m, t, k, LogitDiff(40, 7)), "token id 40")
    r = run_readout(m, t, k)
    logits = np.asarray(r.logits[:, -1])
    np.testing.assert_allclose(float(LogitDiff([5], 7)(r)), np.mean(logits[:, 5] - logits[:, 7]), rtol=1e-5)
    per_row = LogitDiff(np.asarray([1, 2, 3]), 7)(r)
    np.testing.assert_allclose(float(per_row), np.mean(logits[np.arange(3), [1, 2, 3]] - logits[:, 7]), rtol=1e-5)
    logp = np.asarray(jax.nn.log_softmax(r.logits[:, -1]))
    np.testing.assert_allclose(float(TokenLogProb(5)(r)), logp[:, 5].mean(), rtol=1e-5)
    any_of = np.log(np.exp(logp[:, [5, 6]]).sum(1)).mean()
    np.testing.assert_allclose(float(TokenLogProb([5, 6], any_of=True)(r)), any_of, rtol=1e-5)


def test_next_token_loss_with_default_positions(tiny):
    m, t, k = tiny
    loss = NextTokenLoss(t, k)
    want = float(loss(run_readout(m, t, k, positions=None)))
    logp = np.asarray(jax.nn.log_softmax(run_readout(m, t, k, positions=None).logits, -1))
    w = np.asarray(k[:, 1:] * k[:, :-1])
    by_hand = -(np.take_along_axis(logp[:, :-1], np.asarray(t)[:, 1:, None], -1)[..., 0] * w).sum() / w.sum()
    np.testing.assert_allclose(want, by_hand, rtol=1e-5)
    np.testing.assert_allclose(sweeps.baseline(m, t, k, loss), want, rtol=1e-5)
    effects = sweeps.head_ablation(m, t, k, loss, progress=False)
    one = float(loss(run_readout(m, t, k, (I.zero_heads(CFG, [(2, 1)]),), positions=None))) - want
    np.testing.assert_allclose(effects[2, 1], one, atol=1e-5)
    raises(lambda: loss(run_readout(m, t, k)), "positions=None")


# ----------------------------------------------------------------------------- grad, stacks, sweep defaults


def test_jax_grad_through_an_intervention_pytree(tiny):
    m, t, k = tiny
    metric = TokenLogProb(7)
    v = jax.random.normal(jax.random.key(3), (CFG.d_model,))
    iv = I.AddVector("resid_pre", v, scale=0.5, layers=(1,), positions=(-1,))
    f = lambda iv: metric(run_readout(m, t, k, (iv,)))
    g = jax.grad(f)(iv)  # the selection is static: no integer leaf
    assert isinstance(g, I.AddVector) and g.where == iv.where
    gv = jax.grad(lambda v: f(I.AddVector("resid_pre", v, scale=0.5, layers=(1,), positions=(-1,))))(v)
    np.testing.assert_allclose(np.asarray(g.vector), np.asarray(gv), rtol=1e-5, atol=1e-7)
    eps = 1e-2
    fd = (f(eqx.tree_at(lambda x: x.scale, iv, iv.scale + eps)) - f(eqx.tree_at(lambda x: x.scale, iv, iv.scale - eps)))
    np.testing.assert_allclose(float(g.scale), float(fd) / (2 * eps), rtol=2e-2, atol=1e-4)
    # a stacked batch keeps its selections as integer arrays: vmap works, eqx.filter_grad differentiates it
    items = I.stack([I.AddVector("resid_pre", v, scale=s, layers=(l,)) for s, l in ((0.5, 0), (1.0, 2))])
    vals = jax.vmap(f)(items)
    np.testing.assert_allclose(np.asarray(vals), [float(f(I.unstack(items, i))) for i in range(2)], rtol=1e-5)
    gs = eqx.filter_grad(lambda it: jnp.sum(jax.vmap(f)(it)))(items)
    assert gs.vector.shape == (2, CFG.d_model) and gs.where.layers is None


def test_sweep_defaults_and_progress(tiny, monkeypatch):
    m, t, k = tiny
    first = np.repeat(np.arange(30), 9)
    monkeypatch.setitem(sweeps.COMPILE_S, "cpu", 1e9)  # compiling dominates: one program
    assert len(np.unique(sweeps.program_starts(first, "auto", 30, 28))) == 1
    monkeypatch.setitem(sweeps.COMPILE_S, "cpu", 0.0)  # free compiles: one program per first layer
    assert len(np.unique(sweeps.program_starts(first, "auto", 30, 28))) == 30
    raises(lambda: sweeps.program_starts(first, 0), "max_programs")
    monkeypatch.setenv("INTERP_PROGRESS", "0")
    assert not progress.enabled() and progress.enabled(True)
    monkeypatch.setenv("INTERP_PROGRESS", "1")
    assert progress.enabled() and not progress.enabled(False)
    metric = LogitDiff(np.asarray([1, 2, 3]), 7)
    np.testing.assert_allclose(sweeps.head_ablation(m, t, k, metric, progress=False),
                               sweeps.head_ablation(m, t, k, metric, max_programs=None, progress=False), atol=2e-5)


def test_sae_feature_and_layer_are_checked(tiny):
    from saes.analysis import features
    from saes.core import sae as S

    m, t, k = tiny
    sae = S.init("relu", CFG.d_model, 16, jax.random.key(4), site="resid_post", layer=1)
    raises(lambda: features.steer(sae, feature=16, value=2.0), "feature", "16", "0..15")
    raises(lambda: fwd(m, t, k, [features.steer(S.init("relu", CFG.d_model, 16, jax.random.key(4), site="resid_post",
                                                       layer=5), feature=3, value=2.0)]), "layer", "0..2")
    fwd(m, t, k, [features.steer(sae, feature=15, value=2.0)])
