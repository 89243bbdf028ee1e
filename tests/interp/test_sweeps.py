"""Sweeps on tiny random models: planted effects are found, the one-call sweeps equal loops of single runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from interp import interventions as I
from interp import sweeps
from interp.readout import ContinuationLoss, LogitDiff, NextTokenLoss, run_readout
from models.testing import random_model, tiny_config

CFG = tiny_config("llama", vocab_size=40, n_kv_heads=4)
PLANTED = (1, 2)  # (layer, head)
A, B = 5, 9  # the planted head writes towards token A and away from token B


@pytest.fixture(scope="module")
def planted():
    """Rows alternate between tokens 10-24 and 25-39; embedding dimension 0 is +1 on the first set, -1 on the
    second. Head PLANTED reads that sign through W_V and writes sign * (W_U[:, A] - W_U[:, B]) through W_O,
    so with targets A (even rows) / B (odd rows) it carries the whole logit difference."""
    m = random_model(CFG, jax.random.key(0), scale=0.1)
    p = jax.tree.map(lambda x: x, m.params)
    e = jnp.zeros(CFG.d_model).at[0].set(1.0)
    p["embed"]["W_E"] = p["embed"]["W_E"].at[:, 0].set(jnp.where(jnp.arange(CFG.vocab_size) < 25, 1.0, -1.0))
    layer, head = PLANTED
    p["blocks"]["attn"]["W_V"] = p["blocks"]["attn"]["W_V"].at[layer, :, head].set(jnp.outer(e, jnp.ones(CFG.d_head)))
    u = p["embed"]["W_E"][A] - p["embed"]["W_E"][B]
    p["blocks"]["attn"]["W_O"] = p["blocks"]["attn"]["W_O"].at[layer, head].set(jnp.outer(jnp.ones(CFG.d_head), u))
    m = m.replace_params(p)
    rows = jax.random.randint(jax.random.key(1), (4, 8), 0, 15)
    tokens = rows + jnp.asarray([10, 25, 10, 25])[:, None]
    return m, tokens, jnp.ones_like(tokens)


METRIC = LogitDiff(jnp.asarray([A, B, A, B]), jnp.asarray([B, A, B, A]))


def loop(m, tokens, mask, metric, make, items):
    base = float(metric(run_readout(m, tokens, mask)))
    run = jax.jit(lambda iv: metric(run_readout(m, tokens, mask, (iv,))))
    return np.asarray([float(run(make(*it))) for it in items]) - base


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
def test_head_ablation_finds_planted_head_and_equals_loop(planted, kind):
    m, t, k = planted
    metric = METRIC
    effects = sweeps.head_ablation(m, t, k, metric, kind=kind)
    assert effects.shape == (CFG.n_layers, CFG.n_heads)
    assert np.unravel_index(np.argmin(effects), effects.shape) == PLANTED
    assert effects[PLANTED] < -5 * np.abs(np.delete(effects.ravel(), np.ravel_multi_index(PLANTED, effects.shape))).max()
    _, _, source = sweeps.ablation_replacement(m, t, k, kind, None, None)
    items = [(l, h) for l in range(CFG.n_layers) for h in range(CFG.n_heads)]
    make = lambda l, h: I.Replace("attn.z", source, layers=(l,), heads=np.eye(CFG.n_heads, dtype=bool)[h])
    np.testing.assert_allclose(effects.ravel(), loop(m, t, k, metric, make, items), atol=2e-5)


def test_grouping_chunking_and_stacked_mode_agree(planted):
    m, t, k = planted
    metric = METRIC
    exact = sweeps.head_ablation(m, t, k, metric)
    np.testing.assert_allclose(sweeps.head_ablation(m, t, k, metric, max_programs=1), exact, atol=2e-5)
    np.testing.assert_allclose(sweeps.head_ablation(m, t, k, metric, batch_size=5, max_programs=2), exact, atol=2e-5)
    np.testing.assert_allclose(sweeps.head_ablation(m, t, k, metric, batch_size=0), exact, atol=2e-5)  # one vmap
    assert sweeps.default_batch_size(270, 512) == 8 and sweeps.default_batch_size(4, 512) is None
    # a large vocabulary caps the logits a chunk holds (Gemma's 262k: 2 items of 512 tokens in 1 GiB), a small one not
    assert sweeps.default_batch_size(270, 512, vocab=262_144) == 2
    assert sweeps.default_batch_size(270, 512, vocab=49_152) == 8
    assert sweeps.default_batch_size(270, 8192, vocab=262_144) == 1
    # the same sweep as a stack of ScaleHeads masks (stacked mode, first layers read from the masks)
    masks = np.ones((12, CFG.n_layers, CFG.n_heads), np.float32)
    masks[np.arange(12), np.arange(12) // 4, np.arange(12) % 4] = 0
    stacked = I.ScaleHeads(masks)
    assert list(I.first_layers(stacked, 12, CFG.n_layers)) == [0] * 4 + [1] * 4 + [2] * 4
    base = float(metric(run_readout(m, t, k)))
    np.testing.assert_allclose(sweeps.sweep(m, t, k, metric, (stacked,)) - base, exact.ravel(), atol=2e-5)


def test_plan_calls_pads_little_and_keeps_one_layer_per_call():
    layers = np.repeat(np.arange(2), 9)[:, None]  # 2 layers x 9 heads, as head_ablation's items
    plan = sweeps.plan_calls(layers[:, 0], layers, cap=8)  # one program per layer: a run of 9 is one call of 9
    assert [(s, size, shared, [list(c) for c in calls]) for s, size, shared, calls in plan] == [
        (0, 9, True, [list(range(9))]), (1, 9, True, [list(range(9, 18))])]
    assert [(size, len(calls)) for _, size, _, calls in sweeps.plan_calls(layers[:, 0], layers, cap=5)] == [(5, 2)] * 2
    assert [size for _, size, _, _ in sweeps.plan_calls(layers[:, 0], layers, cap=8, k=2)] == [10, 10]  # a mesh of 2
    one = np.zeros(18, np.int64)  # one program from layer 0
    (_, size, shared, calls), = sweeps.plan_calls(one, layers, cap=None)
    assert (size, shared, len(calls)) == (18, False, 1)  # one call: splitting by layer would cost a second call
    (_, size, shared, calls), = sweeps.plan_calls(one, layers, cap=9)
    assert (size, shared) == (9, True) and [set(layers[c, 0]) for c in calls] == [{0}, {1}]
    uneven = np.asarray([0] * 3 + [1] * 9)[:, None]  # runs of 3 and 9 would pad the 3 to 9: not split
    (_, size, shared, calls), = sweeps.plan_calls(np.zeros(12, np.int64), uneven, cap=8)
    assert (size, shared, len(calls)) == (6, False, 2)
    (_, size, _, calls), = sweeps.plan_calls(np.zeros(12, np.int64), None, cap=8)
    assert sorted(np.concatenate(calls)) == list(range(12))


def test_activation_patching_known_effect_and_loop(planted):
    m, t, k = planted
    corrupt = t.at[:, 3].set(t[:, 3] % 5 + 20)  # differs at position 3 only
    metric = METRIC
    clean_score = float(metric(run_readout(m, t, k)))
    corrupt_score = float(metric(run_readout(m, corrupt, k)))
    patched = sweeps.activation_patching(m, (t, k), (corrupt, k), metric)
    assert patched.shape == (CFG.n_layers, 8)
    np.testing.assert_allclose(patched[0, 3], clean_score - corrupt_score, atol=1e-5)  # restores the clean run
    np.testing.assert_allclose(np.delete(patched[0], 3), 0.0, atol=1e-6)  # nothing else differs at layer 0
    np.testing.assert_allclose(patched[:, :3], 0.0, atol=1e-6)  # causal: earlier positions never differ
    _, clean_acts = models.forward(m, t, k, capture=["resid_pre", "attn.z"])
    items = [(l, p) for l in range(CFG.n_layers) for p in range(8)]
    make = lambda l, p: I.patch("resid_pre", clean_acts["resid_pre"], layers=(l,), tokens=np.arange(8) == p)
    np.testing.assert_allclose(patched.ravel(), loop(m, corrupt, k, metric, make, items), atol=2e-5)
    per_head = sweeps.activation_patching(m, (t, k), (corrupt, k), metric, site="attn.z", per="head")
    items = [(l, h) for l in range(CFG.n_layers) for h in range(CFG.n_heads)]
    make = lambda l, h: I.patch("attn.z", clean_acts["attn.z"], layers=(l,), heads=np.arange(4) == h)
    np.testing.assert_allclose(per_head.ravel(), loop(m, corrupt, k, metric, make, items), atol=2e-5)


def test_mean_or_resample_that_replaces_each_head_by_itself_is_an_error(planted):
    """A one-prompt batch as its own reference (issue 42: every effect was float noise), identical prompts, or
    a reference equal to the input; a reference of other prompts works."""
    m, t, k = planted
    one = (t[:1], k[:1])
    for kind in ("mean", "resample"):
        with pytest.raises(models.InputError, match="one-prompt batch.*own output.*reference="):
            sweeps.head_ablation(m, *one, LogitDiff(A, B), kind=kind)
    with pytest.raises(models.InputError, match="identical"):
        sweeps.head_ablation(m, jnp.tile(t[:1], (2, 1)), jnp.tile(k[:1], (2, 1)), LogitDiff(A, B), kind="mean")
    with pytest.raises(models.InputError, match="same prompts as the input"):
        sweeps.head_ablation(m, t, k, METRIC, kind="resample", reference=(t, k))
    with pytest.raises(models.InputError, match="own output"):
        sweeps.head_ablation_attribution(m, *one, LogitDiff(A, B), kind="mean")
    effects = sweeps.head_ablation(m, *one, LogitDiff(A, B), kind="mean", reference=(t, k))
    assert effects[PLANTED] < -1.0  # row 0 reads +1 through the planted head, the mean over 4 rows 0


def test_activation_patching_chosen_layers(planted):
    m, t, k = planted
    corrupt = t.at[:, 3].set(t[:, 3] % 5 + 20)
    full = sweeps.activation_patching(m, (t, k), (corrupt, k), METRIC)
    some = sweeps.activation_patching(m, (t, k), (corrupt, k), METRIC, layers=(2, 0))
    np.testing.assert_allclose(some, full[[2, 0]], atol=2e-5)
    heads = sweeps.activation_patching(m, (t, k), (corrupt, k), METRIC, site="attn.z", per="head", layers=[1])
    assert heads.shape == (1, CFG.n_heads)
    for bad, what in (((3,), "out of range"), ((), "non-empty"), ((0.5,), "integer")):
        with pytest.raises(models.InputError, match=what):
            sweeps.activation_patching(m, (t, k), (corrupt, k), METRIC, layers=bad)


class _Tok:
    """A stand-in tokenizer: token id i reads "t{i}"."""

    def decode(self, ids, skip_special=True):
        return "".join(f"t{int(i)}" for i in ids)


def test_patch_grid_labels_tops_plots_and_computes_as_its_array(planted, tmp_path):
    m, t, k = planted
    corrupt = t.at[:, 3].set(t[:, 3] % 5 + 20)
    k_pad = k.at[0, 0].set(0)  # row 0 left-padded by one
    plain = sweeps.activation_patching(m, (t, k), (corrupt, k), METRIC)
    assert isinstance(plain, sweeps.PatchGrid) and plain.tokens == () and plain.layers == (0, 1, 2)
    assert plain.column_labels() == [str(j) for j in range(8)]
    mt = models.Model(m.params, m.cfg, _Tok(), "tiny")
    g = sweeps.activation_patching(mt, (t, k_pad), (corrupt, k_pad), METRIC, layers=(2, 0))
    ref = sweeps.activation_patching(m, (t, k_pad), (corrupt, k_pad), METRIC)
    np.testing.assert_allclose(g, np.asarray(ref)[[2, 0]], atol=2e-5)  # the labels change nothing
    # labels: row 0's tokens, "clean→corrupt" where they differ, "<pad>" on padding
    assert g.tokens[0] == "<pad>" and g.tokens[1] == f"t{int(t[0, 1])}"
    assert g.tokens[3] == f"t{int(t[0, 3])}→t{int(corrupt[0, 3])}"
    assert g.layers == (2, 0) and g.shape == (2, 8) and g.per == "position"
    i, j = np.unravel_index(np.argmax(np.abs(np.asarray(g))), g.shape)
    label, value = g.top(1)[0]
    assert label == f"L{(2, 0)[i]} @{j} {g.tokens[j]!r}" and value == g[i, j]
    assert [v for _, v in g.top(16)] == sorted(np.asarray(g).ravel(), key=abs, reverse=True)
    assert repr(g).startswith(f"PatchGrid({g.name!r}, 2 layers x 8 positions; largest |value|: {label} ")
    assert "\n" not in repr(g) and len(repr(g)) < 200 and g.name.startswith("resid_pre patching of ")
    table = g.table(2).splitlines()
    assert table[0] == f"| position | {g.name} |" and len(table) == 4 and table[2].startswith(f"| {label} |")
    fig = g.plot(path=str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0
    assert [x.get_text() for x in fig.axes[0].get_xticklabels()] == [f"{j} {s!r}" for j, s in enumerate(g.tokens)]
    assert [y.get_text() for y in fig.axes[0].get_yticklabels()] == ["2", "0"]
    assert fig.axes[0].get_xlabel() == "position"
    # computes as its array, as callers of the bare array expect
    np.testing.assert_allclose(g - np.asarray(g), 0.0)
    assert isinstance(np.abs(g), np.ndarray) and g.ravel().shape == (16,) and len(g) == 2
    heads = sweeps.activation_patching(mt, (t, k), (corrupt, k), METRIC, site="attn.z", per="head", layers=[1])
    assert heads.tokens == () and heads.column == "head" and heads.top(1)[0][0].startswith("L1H")
    est = sweeps.attribution_patching(mt, (t, k_pad), (corrupt, k_pad), METRIC)
    assert isinstance(est, sweeps.PatchGrid) and est.tokens == g.tokens and est.layers == (0, 1, 2)
    with pytest.raises(models.InputError, match="layers names 1 layers for 2 rows"):
        sweeps.PatchGrid(np.zeros((2, 3)), layers=(0,))
    with pytest.raises(models.InputError, match="one per column"):
        sweeps.PatchGrid(np.zeros((2, 3)), tokens=("a",))
    with pytest.raises(models.InputError, match="per must be"):
        sweeps.PatchGrid(np.zeros((2, 3)), per="token")
    with pytest.raises(models.InputError, match=r"\[layers, positions\]"):
        sweeps.PatchGrid(np.zeros(3))


def test_attribution_patching(planted):
    m, t, k = planted
    metric = METRIC
    exact = sweeps.head_ablation(m, t, k, metric)
    approx = sweeps.head_ablation_attribution(m, t, k, metric)
    assert np.unravel_index(np.argmin(approx), approx.shape) == PLANTED
    assert approx.shape == exact.shape and approx[PLANTED] < 0  # (the final norm makes the size non-linear)
    corrupt = t.at[:, 3].set(t[:, 3] % 5 + 20)
    est = sweeps.attribution_patching(m, (t, k), (corrupt, k), metric)
    assert est.shape == (CFG.n_layers, 8)
    np.testing.assert_allclose(est[:, :3], 0.0, atol=1e-6)
    patched = sweeps.activation_patching(m, (t, k), (corrupt, k), metric)
    assert sweeps.rank_correlation(patched[:, 3:], est[:, 3:]) > 0.5


def test_metric_over_all_positions(planted):
    m, t, k = planted
    loss = NextTokenLoss(t, k)
    effects = sweeps.head_ablation(m, t, k, loss, positions=None)
    base = float(loss(run_readout(m, t, k, positions=None)))
    want = float(loss(run_readout(m, t, k, (I.zero_heads(CFG, [(2, 1)]),), positions=None))) - base
    np.testing.assert_allclose(effects[2, 1], want, atol=1e-5)


def test_continuation_loss_by_hand_on_left_padded_rows(planted):
    """ContinuationLoss reads only the positions before each row's continuation (its last `lengths[b]` real
    tokens of a left-padded batch) and equals the NLL computed from the full logits; in a sweep, the same."""
    m, t, _ = planted
    t = np.asarray(t)
    k = np.ones_like(t)
    k[1, :3] = 0  # a left-padded row
    lengths = np.asarray([3, 2, 1, 0])
    loss = ContinuationLoss.of(t, lengths)
    assert loss.positions == (-4, -3, -2)
    logp = np.asarray(jax.nn.log_softmax(models.forward(m, t, k)[0], -1))
    nll = [-logp[b, j - 1, t[b, j]] for b in range(4) for j in range(t.shape[1] - lengths[b], t.shape[1])]
    got = sweeps.baseline(m, t, k, loss)
    np.testing.assert_allclose(got, np.mean(nll), rtol=1e-5)
    iv = I.stack([I.zero_heads(CFG, [(2, 1)])])
    logp = np.asarray(jax.nn.log_softmax(models.forward(m, t, k, interventions=(I.zero_heads(CFG, [(2, 1)]),))[0], -1))
    nll = [-logp[b, j - 1, t[b, j]] for b in range(4) for j in range(t.shape[1] - lengths[b], t.shape[1])]
    np.testing.assert_allclose(sweeps.sweep(m, t, k, loss, (iv,), progress=False)[0], np.mean(nll), rtol=1e-5)
    with pytest.raises(models.InputError, match="leaves no context"):
        ContinuationLoss.of(t, np.asarray([8, 1, 1, 1]))


def test_rank_correlation():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    b[:10] = a[:10] = 1.0  # ties
    np.testing.assert_allclose(sweeps.rank_correlation(a, b), spearmanr(a, b).statistic, atol=1e-12)
    assert sweeps.rank_correlation(a, 2 * a + 1) == pytest.approx(1.0)
