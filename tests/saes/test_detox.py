"""SAE detox tools on a tiny random model: the two-set feature contrast against brute force, and the feature
ablation / decoder-steering interventions (constant, per-input, per-token) in forward, vmap and generation."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from interp import interventions as I
from interp.readout import NextTokenLoss, run_readout
from interp.sweeps import sweep
from models.testing import random_model, tiny_config
from models.errors import InputError
from saes.core import sae as S
from saes.analysis.detox import DecoderSteer, FeatureAblation, TokenSteer, fires_anywhere, gate_mask, token_gate
from saes.analysis.features import contrast
from tests.models.test_tl_user import byte_level_tokenizer

LAYER, WIDTH = 1, 48
TEXTS_A = ["Mary went to Paris", "a b", "the cat sat on the mat today", "xyz", "Paris Paris Paris"]
TEXTS_B = ["hello world", "Mary", "numbers 123 456 789", "q"]
PROMPTS = ["Mary went to", "the cat sat on the", "xy"]


@pytest.fixture(scope="module")
def tiny():
    """A 3-layer random llama with a byte-level tokenizer (BOS first) and a ReLU SAE at L1.resid_post whose
    features fire on about a third of the tokens (feature 0 never), with a non-zero b_dec and act_scale 2."""
    tok = byte_level_tokenizer()
    cfg = tiny_config(vocab_size=tok.vocab_size)
    m = models.Model(random_model(cfg, jax.random.key(0)).params, cfg, tok, "tiny")
    sae = S.init("relu", cfg.d_model, WIDTH, jax.random.key(1), site="resid_post", layer=LAYER)
    sae = eqx.tree_at(lambda s: (s.b_dec, s.act_scale), sae,
                      (0.1 * jax.random.normal(jax.random.key(2), (cfg.d_model,)), jnp.asarray(2.0)))
    x = clean_acts(m, TEXTS_A + TEXTS_B)[0]
    pre = np.sort(np.asarray(sae.pre_acts(x * sae.act_scale)).reshape(-1, WIDTH), 0)
    i = int(0.7 * len(pre))
    b_enc = -(pre[i - 1] + pre[i]) / 2  # halfway between two tokens: no token sits at the threshold
    b_enc[0] = -1e4
    return m, eqx.tree_at(lambda s: s.b_enc, sae, jnp.asarray(b_enc, jnp.float32))


def clean_acts(m, texts, ivs=()):
    """(resid_post at LAYER [B, T, D], logits, tokens, mask) of the full forward of `texts`."""
    tokens, mask = m.tokenize(texts)
    logits, acts = models.forward(m, tokens, mask, capture=("resid_post",), interventions=tuple(ivs))
    return acts["resid_post"][LAYER], logits, tokens, mask


def after_first(mask):
    """Brute force: real tokens other than each row's first."""
    out = np.zeros(mask.shape, bool)
    for b, row in enumerate(np.asarray(mask)):
        real = np.flatnonzero(row)
        out[b, real[1:]] = True
    return out


def raises(fn, *words):
    with pytest.raises(InputError) as e:
        fn()
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# ----------------------------------------------------------------------------- contrast


def test_contrast_matches_brute_force(tiny):
    m, sae = tiny
    c = contrast(m, sae, TEXTS_A, TEXTS_B, batch=2)  # batches of 2 texts, a last batch of 1
    for texts, (mx, fr, mean, n) in ((TEXTS_A, (c.max_a, c.freq_a, c.mean_a, c.n_tokens_a)),
                                     (TEXTS_B, (c.max_b, c.freq_b, c.mean_b, c.n_tokens_b))):
        x, _, _, mask = clean_acts(m, texts)
        h = np.asarray(sae.encode(x))[after_first(mask)]  # [N, width]
        assert n == h.shape[0] == sum(len(m.tokenize([t])[0][0]) - 1 for t in texts)
        np.testing.assert_allclose(mx, h.max(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fr, (h > 0).mean(0), atol=1e-7)
        np.testing.assert_allclose(mean, h.mean(0), rtol=1e-5, atol=1e-6)
    assert c.freq_a[0] == 0 and 0.1 < c.freq_a.mean() < 0.6
    fire = np.flatnonzero(c.freq_a > 0)
    for by, (a, b) in {"max": (c.max_a, c.max_b), "freq": (c.freq_a, c.freq_b),
                       "mean_diff": (c.mean_a, c.mean_b)}.items():
        score = a - b
        want = sorted(fire, key=lambda f: -score[f])[:5]
        np.testing.assert_array_equal(c.top(5, by=by), want)
    counts_a, counts_b = c.freq_a * c.n_tokens_a, c.freq_b * c.n_tokens_b  # the ratio by hand, add-one smoothed
    ratio = ((counts_a + 1) / (c.n_tokens_a + 1)) / ((counts_b + 1) / (c.n_tokens_b + 1))
    np.testing.assert_array_equal(c.top(5, by="ratio"), sorted(fire, key=lambda f: -ratio[f])[:5])
    assert 0 not in c.top(len(fire))  # never fires on set a: never ranked
    raises(lambda: c.top(3, by="odds"), "by='odds'", "'max'", "'freq'", "'mean_diff'", "'ratio'")
    raises(lambda: c.top(0), "k=0", f"1..{len(fire)}")
    raises(lambda: c.top(len(fire) + 1), f"k={len(fire) + 1}", f"1..{len(fire)}")
    raises(lambda: contrast(m, sae, [], TEXTS_B), "texts_a")


# ----------------------------------------------------------------------------- interventions


def test_ablation_removes_exactly_the_features_contributions(tiny):
    m, sae = tiny
    x, clean, _, mask = clean_acts(m, PROMPTS)
    ablated, _, _, _ = clean_acts(m, PROMPTS, [FeatureAblation(sae, np.arange(WIDTH))])
    # every feature ablated: x - (x_hat - b_dec / act_scale) on the tokens the SAE reads, x elsewhere
    read = after_first(mask)[..., None]
    x_hat = sae(x)
    want = np.where(read, x - (x_hat - sae.b_dec / sae.act_scale), x)
    np.testing.assert_allclose(ablated, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(ablated - x))[read[..., 0]].max() > 1e-3
    # one feature: only its contribution h_f d_f goes
    f = 7
    one, _, _, _ = clean_acts(m, PROMPTS, [FeatureAblation(sae, [f, f])])  # a set: duplicates count once
    h = np.asarray(sae.encode(x))[..., f:f + 1]
    np.testing.assert_allclose(one, np.where(read, x - h * (sae.W_dec[f] / sae.act_scale), x), rtol=1e-5, atol=1e-5)
    # a feature that never fires changes nothing
    _, logits, _, _ = clean_acts(m, PROMPTS, [FeatureAblation(sae, [0])])
    np.testing.assert_array_equal(logits, clean)


def test_constant_steer_is_add_vector_of_the_summed_directions(tiny):
    m, sae = tiny
    F, alpha = [3, 7, 11], 2.5
    _, steered, _, mask = clean_acts(m, PROMPTS, [DecoderSteer(sae, F, alpha)])
    v = (sae.W_dec[jnp.asarray(F)] / sae.act_scale).sum(0)
    _, ref, _, _ = clean_acts(m, PROMPTS, [I.AddVector("resid_post", v, -alpha, layers=(LAYER,))])
    real = np.asarray(mask) > 0  # AddVector also edits pad positions; compare the real tokens' logits
    np.testing.assert_allclose(np.asarray(steered)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-5)


def test_per_token_steer_changes_only_where_a_feature_fires(tiny):
    m, sae = tiny
    F = [3, 7]
    x, _, _, mask = clean_acts(m, PROMPTS)
    steered, _, _, _ = clean_acts(m, PROMPTS, [DecoderSteer(sae, F, 4.0, gate="per_token")])
    fires = (np.asarray(sae.encode(x))[..., F] > 0).any(-1) & after_first(mask)
    assert 0 < fires.sum() < after_first(mask).sum()
    changed = np.abs(np.asarray(steered - x)).max(-1) > 0
    np.testing.assert_array_equal(changed, fires)
    v = (sae.W_dec[jnp.asarray(F)] / sae.act_scale).sum(0)
    np.testing.assert_allclose(np.asarray(steered)[fires], np.asarray(x - 4.0 * v)[fires], rtol=1e-5, atol=1e-5)


def test_per_input_steer_leaves_ungated_rows_bit_identical(tiny):
    m, sae = tiny
    x, clean, tokens, mask = clean_acts(m, PROMPTS)
    F = [6, 13]
    gate = fires_anywhere(m, sae, F, tokens, mask)
    fires = (np.asarray(sae.encode(x))[..., F] > 0).any(-1) & after_first(mask)  # [B, T]
    np.testing.assert_array_equal(gate, fires.any(1))
    assert gate.any() and not gate.all()
    iv = DecoderSteer(sae, F, 4.0, gate="per_input", row_gate=gate)
    steered_x, steered, _, _ = clean_acts(m, PROMPTS, [iv])
    np.testing.assert_array_equal(steered_x[~gate], x[~gate])
    np.testing.assert_array_equal(steered[~gate], clean[~gate])
    assert np.abs(np.asarray(steered[gate] - clean[gate])).max() > 1e-3
    raises(lambda: clean_acts(m, PROMPTS[:2], [iv]), "row_gate", "[2]")


def test_vmap_over_alpha_is_a_loop(tiny):
    m, sae = tiny
    _, clean, tokens, mask = clean_acts(m, PROMPTS)
    alphas = jnp.asarray([0.0, 1.0, 3.0])
    for gate in ("constant", "per_token"):
        def run(a, gate=gate):
            return models.forward(m, tokens, mask, interventions=(DecoderSteer(sae, [3, 7], a, gate),))[0]

        batched = jax.vmap(run)(alphas)
        for i, a in enumerate(alphas):
            np.testing.assert_allclose(batched[i], run(a), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(batched[0], clean, rtol=1e-5, atol=1e-5)


def test_all_four_in_generate(tiny):
    m, sae = tiny
    F = [3, 7]
    tokens, mask = m.tokenize(PROMPTS)
    gate = fires_anywhere(m, sae, F, tokens, mask)
    gen = lambda *ivs: models.generate(m, PROMPTS, 6, interventions=ivs, return_tokens=True)  # noqa: E731
    plain = gen()
    kinds = dict(constant={}, per_token=dict(gate="per_token"), per_input=dict(gate="per_input", row_gate=gate))
    for name, kw in kinds.items():
        assert gen(DecoderSteer(sae, F, 0.0, **kw)) == plain, name
        assert len(gen(DecoderSteer(sae, F, 50.0, **kw))) == len(PROMPTS)
    assert gen(DecoderSteer(sae, F, 50.0)) != plain  # strong steering changes the text
    assert gen(FeatureAblation(sae, [0])) == plain
    assert len(gen(FeatureAblation(sae, F))) == len(PROMPTS)


def pair_rows(m, context: str, continuations: list[str]):
    """Left-padded `context + continuation` rows (tokenised apart: the boundary is exact) and the context's
    token count (BOS included), as a study scores continuations."""
    ctx = m.tokenizer.encode(context, add_bos=True)
    rows = [ctx + m.tokenizer.encode(c) for c in continuations]
    width = max(map(len, rows))
    tok, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        tok[b, width - len(r):], mask[b, width - len(r):] = r, 1
    return tok, mask, np.full(len(rows), len(ctx))


def test_per_input_gate_reads_the_context_only(tiny):
    m, sae = tiny
    # a feature set that fires on a continuation and nowhere in the context "xy"
    tok, mask, n_ctx = pair_rows(m, "xy", [" numbers 123 456 789 Paris", " q"])
    on = token_gate(m, sae, np.arange(WIDTH), tok, mask)
    np.testing.assert_array_equal(on, after_first(mask))  # token_gate: every token a feature fires on
    x = np.asarray(clean_acts_tokens(m, tok, mask))
    h = np.asarray(sae.encode(x)) > 0  # [B, T, W]
    ctx_pos = np.zeros(mask.shape, bool)
    for b in range(2):
        real = np.flatnonzero(mask[b])
        ctx_pos[b, real[1:n_ctx[b]]] = True
    in_ctx = h[ctx_pos].any(0)
    F = np.flatnonzero(h[0][~ctx_pos[0] & (mask[0] > 0)].any(0) & ~in_ctx)[:4]
    assert len(F) >= 1
    assert fires_anywhere(m, sae, F, tok, mask).tolist()[0]  # the whole row: the continuation gates its row
    gate = fires_anywhere(m, sae, F, tok, mask, context=n_ctx)
    assert gate.tolist() == [False, False]  # its context alone does not
    # a context the features fire in gates both mates, whatever their continuations (different paddings)
    G = np.flatnonzero(in_ctx)[:3]
    assert len(G) >= 1
    assert fires_anywhere(m, sae, G, tok, mask, context=n_ctx).tolist() == [True, True]
    tok2, mask2, n2 = pair_rows(m, "Mary went to Paris", [" a", " numbers 123 456", " xyz q"])
    for feats in ([f] for f in range(1, WIDTH)):
        g = fires_anywhere(m, sae, feats, tok2, mask2, context=n2)
        assert g.all() or not g.any(), feats  # the three mates share one gate
    # the per-input gate mask: exactly the real tokens of gated rows
    np.testing.assert_array_equal(gate_mask("per_input", m, sae, G, tok, mask, n_ctx), mask > 0)
    np.testing.assert_array_equal(gate_mask("per_input", m, sae, F, tok, mask, n_ctx), np.zeros(mask.shape, bool))
    raises(lambda: fires_anywhere(m, sae, F, tok, mask, context=n_ctx + 20), "fires_anywhere context")
    raises(lambda: fires_anywhere(m, sae, F, tok, mask, context=[0, 1]), "fires_anywhere context")
    raises(lambda: fires_anywhere(m, sae, F, tok, mask, context=[3]), "fires_anywhere context")


def clean_acts_tokens(m, tok, mask):
    _, acts = models.forward(m, tok, mask, capture=("resid_post",))
    return acts["resid_post"][LAYER]


def test_token_steer_is_decoder_steer_with_its_gate_read_beforehand(tiny):
    m, sae = tiny
    tokens, mask = m.tokenize(PROMPTS)
    F, a = [3, 7], 3.0
    v = np.asarray((sae.W_dec[jnp.asarray(F)] / sae.act_scale).sum(0))
    other = np.asarray(jax.random.normal(jax.random.key(5), v.shape))
    fwd = lambda iv: np.asarray(models.forward(m, tokens, mask, interventions=(iv,))[0])  # noqa: E731
    row = fires_anywhere(m, sae, F, tokens, mask)
    for tier in ("constant", "per_input", "per_token"):
        g = gate_mask(tier, m, sae, F, tokens, mask)
        for d in (None, other):
            kw = dict(row_gate=row) if tier == "per_input" else {}
            want = fwd(DecoderSteer(sae, F, a, tier, direction=d, **kw))
            got = fwd(TokenSteer(sae, v if d is None else d, a, g))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=tier)
    # a stack of directions x strengths swept at once equals each alone
    g = gate_mask("per_token", m, sae, F, tokens, mask)
    items = [(d, s) for d in (v, other) for s in (0.0, 2.0, 5.0)]
    got = sweep(m, tokens, mask, NextTokenLoss(tokens, mask), (I.stack([TokenSteer(sae, d, s, g) for d, s in items]),),
                progress=False)
    plain = float(NextTokenLoss(tokens, mask)(run_readout(m, tokens, mask, (), None)))
    assert abs(got[0] - plain) < 1e-5 and abs(got[3] - plain) < 1e-5  # strength 0 changes nothing
    for i, (d, s) in enumerate(items):
        one = sweep(m, tokens, mask, NextTokenLoss(tokens, mask), (I.stack([TokenSteer(sae, d, s, g)]),),
                    progress=False)
        np.testing.assert_allclose(got[i], one[0], rtol=1e-5, atol=1e-6)
    assert len(set(np.round(got, 4))) == 5
    # bad gates and generation
    raises(lambda: TokenSteer(sae, v, a, g[0]), "gate", "[batch, seq]")
    raises(lambda: TokenSteer(sae, v[:3], a, g), "TokenSteer direction", str(sae.d_in))
    raises(lambda: TokenSteer(sae, v, [a, a], g), "alpha", "scalar")
    raises(lambda: models.forward(m, tokens[:2], mask[:2], interventions=(TokenSteer(sae, v, a, g),)), "gate")
    raises(lambda: models.generate(m, PROMPTS, 3, interventions=(TokenSteer(sae, v, a, g),)), "DecoderSteer")
    raises(lambda: DecoderSteer(sae, F, a, direction=v[:3]), "DecoderSteer direction")


def test_bad_arguments(tiny):
    m, sae = tiny
    raises(lambda: FeatureAblation(sae, [2, WIDTH]), "FeatureAblation features", str(WIDTH), f"0..{WIDTH - 1}")
    raises(lambda: DecoderSteer(sae, [-1], 1.0), "DecoderSteer features", "-1", f"0..{WIDTH - 1}")
    raises(lambda: fires_anywhere(m, sae, [WIDTH], *m.tokenize(PROMPTS)), "fires_anywhere features")
    raises(lambda: DecoderSteer(sae, [1], 1.0, gate="sometimes"), "gate='sometimes'", "'per_token'")
    raises(lambda: DecoderSteer(sae, [1], 1.0, gate="per_input"), "row_gate")
    raises(lambda: DecoderSteer(sae, [1], 1.0, row_gate=[True]), "row_gate")
    raises(lambda: DecoderSteer(sae, [1], [1.0, 2.0]), "alpha", "scalar")
    deep = S.init("relu", 32, WIDTH, jax.random.key(1), site="resid_post", layer=5)
    raises(lambda: clean_acts(m, PROMPTS, [DecoderSteer(deep, [1], 1.0)]), "layers", "0..2")
