"""Interventions on a tiny random Llama: selection, composition, vmap, grad, generation, weight edits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from interp import interventions as I
from interp.readout import TokenLogProb, run_readout
from models.testing import random_model, tiny_config
from interp.weights import orthogonalize
from models.errors import InputError
from models.generate import generate_tokens

CFG = tiny_config("llama", vocab_size=40)
GPT2 = tiny_config("gpt2", vocab_size=40, act="gelu", tie_embeddings=False)


@pytest.fixture(scope="module")
def tiny():
    m = random_model(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, CFG.vocab_size)
    mask = jnp.asarray([[1] * 9, [0, 0] + [1] * 7, [0] * 4 + [1] * 5])  # left-padded rows
    return m, tokens, mask


def fwd(m, tokens, mask, ivs=(), capture=()):
    return models.forward(m, tokens, mask, capture=capture, interventions=tuple(ivs))


def test_zero_addition_is_exactly_no_intervention(tiny):
    m, t, k = tiny
    plain, _ = fwd(m, t, k)
    added, _ = fwd(m, t, k, [I.AddVector("resid_pre", jnp.zeros(CFG.d_model), scale=3.0)])
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(added))


def test_where_layers_positions_tokens_heads(tiny):
    m, t, k = tiny
    v = jnp.ones(CFG.d_model)
    _, base = fwd(m, t, k, capture=["resid_pre"])
    _, acts = fwd(m, t, k, [I.AddVector("resid_pre", v, layers=(1,), positions=(2,))], capture=["resid_pre"])
    diff = np.asarray(acts["resid_pre"] - base["resid_pre"])
    assert np.all(diff[0] == 0)  # layer 0 untouched
    pos = np.asarray(models.transformer.default_positions(k))
    np.testing.assert_allclose(diff[1][pos == 2], 1.0, atol=1e-6)  # position id 2 of every row (padding-aware)
    assert np.all(diff[1][pos != 2] == 0)
    # tokens: a sequence-index mask; heads: a [layers, heads] mask at attn.z
    tok = np.zeros(9, bool)
    tok[-1] = True
    heads = np.zeros((CFG.n_layers, CFG.n_heads), bool)
    heads[2, 1] = True
    _, z0 = fwd(m, t, k, capture=["attn.z"])
    _, z1 = fwd(m, t, k, [I.zero_ablation("attn.z", tokens=tok, heads=heads)], capture=["attn.z"])
    changed = np.asarray(z1["attn.z"] != z0["attn.z"]).any(-1)  # [L, B, T, H]
    assert set(zip(*np.nonzero(changed.any(1))[0::1])) == {(2, 8, 1)}


def test_compose_in_order(tiny):
    m, t, k = tiny
    r = jax.random.normal(jax.random.key(2), (CFG.d_model,))
    ivs = [I.AddVector("resid_mid", 5 * r, layers=(1,)), I.project_out("resid_mid", r, layers=(1,))]
    _, acts = fwd(m, t, k, ivs, capture=["resid_mid"])
    np.testing.assert_allclose(np.asarray(acts["resid_mid"][1] @ r), 0.0, atol=1e-4)  # add, then remove
    _, acts = fwd(m, t, k, ivs[::-1], capture=["resid_mid"])
    assert np.abs(np.asarray(acts["resid_mid"][1] @ r)).min() > 1.0  # remove, then add


def test_set_and_clamp_component(tiny):
    m, t, k = tiny
    r = jax.random.normal(jax.random.key(3), (CFG.d_model,))
    u = r / jnp.linalg.norm(r)
    _, acts = fwd(m, t, k, [I.set_component("resid_post", r, jnp.asarray([1.0, 2.0, 3.0]))], capture=["resid_post"])
    np.testing.assert_allclose(np.asarray(acts["resid_post"] @ u), np.broadcast_to(np.arange(1.0, 4.0)[:, None, None], (3, 3, 9)), atol=1e-5)
    _, acts = fwd(m, t, k, [I.clamp_component("resid_post", r, -0.1, 0.1)], capture=["resid_post"])
    assert np.abs(np.asarray(acts["resid_post"] @ u)).max() <= 0.1 + 1e-5


def test_scale_heads_mean_resample_patch_function(tiny):
    m, t, k = tiny
    _, acts = fwd(m, t, k, capture=["attn.z", "mlp_out"])
    z = acts["attn.z"]
    _, out = fwd(m, t, k, [I.zero_heads(CFG, [(0, 3)])], capture=["attn.z"])
    assert np.all(np.asarray(out["attn.z"][0, :, :, 3]) == 0) and np.all(np.asarray(out["attn.z"][0, :, :, :3] == z[0, :, :, :3]))
    # mean over real tokens of the batch, per position, at layer 0 only
    _, out = fwd(m, t, k, [I.mean_ablation("attn.z", z, k, layers=(0,))], capture=["attn.z"])
    w = np.asarray(k, np.float32)[:, :, None, None]
    want = (np.asarray(z[0]) * w).sum(0) / np.maximum(w.sum(0), 1e-9)
    np.testing.assert_allclose(np.asarray(out["attn.z"][0, 1]), want, atol=1e-6)
    _, out = fwd(m, t, k, [I.resample_ablation("attn.z", z, layers=(0,))], capture=["attn.z"])
    np.testing.assert_allclose(np.asarray(out["attn.z"][0, 0]), np.asarray(z[0, 1]), atol=1e-6)
    # patching a site from a cache of the same run changes nothing
    plain, _ = fwd(m, t, k)
    patched, _ = fwd(m, t, k, [I.patch("mlp_out", acts["mlp_out"])])
    np.testing.assert_allclose(np.asarray(patched), np.asarray(plain), atol=1e-6)
    double = I.Function("mlp_out", lambda x, ctx, s: x * s, jnp.asarray(2.0), layers=(2,))
    halve = I.Function("mlp_out", lambda x, ctx: x / 2, layers=(2,))
    both, _ = fwd(m, t, k, [double, halve])
    np.testing.assert_allclose(np.asarray(both), np.asarray(plain), atol=1e-5)


def test_vmap_over_stacked_interventions_equals_loop(tiny):
    m, t, k = tiny
    vs = jax.random.normal(jax.random.key(4), (5, CFG.d_model))
    items = [I.AddVector("resid_pre", vs[i], scale=0.5 * i, layers=(i % 3,)) for i in range(5)]
    batched = jax.vmap(lambda iv: fwd(m, t, k, [iv])[0])(I.stack(items))
    for i, iv in enumerate(items):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(fwd(m, t, k, [iv])[0]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(I.unstack(I.stack(items), 2).vector), np.asarray(vs[2]))


def test_grad_matches_finite_differences(tiny):
    m, t, k = tiny
    metric = TokenLogProb([7])
    v = jax.random.normal(jax.random.key(5), (CFG.d_model,))

    @jax.jit
    def score(scales):  # a per-layer scale
        return metric(run_readout(m, t, k, (I.AddVector("resid_pre", v, scales),)))

    s0 = jnp.asarray([0.3, -0.2, 0.5])
    g = jax.grad(score)(s0)
    eps = 1e-2
    fd = [(score(s0.at[i].add(eps)) - score(s0.at[i].add(-eps))) / (2 * eps) for i in range(3)]
    np.testing.assert_allclose(np.asarray(g), np.asarray(fd), rtol=2e-2, atol=1e-4)
    # the head mask is differentiable too
    gm = jax.grad(lambda mk: metric(run_readout(m, t, k, (I.ScaleHeads(mk),))))(jnp.ones((3, 4)))
    assert gm.shape == (3, 4) and np.all(np.isfinite(np.asarray(gm))) and np.abs(np.asarray(gm)).max() > 0


def test_generation_steps_and_teacher_forcing(tiny):
    m, t, k = tiny
    key, stops = jax.random.key(0), jnp.zeros((0,), jnp.int32)
    gen = lambda ivs: np.asarray(generate_tokens(m, t, k, key, tuple(ivs), stops, max_new_tokens=5))
    push = 30.0 * m.params["embed"]["W_E"][11]  # tied unembedding: pushes token 11
    plain = gen([])
    late = gen([I.AddVector("resid_post", push, layers=(2,), steps="generated")])
    assert np.all(late[:, 0] == plain[:, 0]) and np.all(late[:, 1:] == 11)  # prompt pass untouched
    always = gen([I.AddVector("resid_post", push, layers=(2,))])
    assert np.all(always == 11)
    # a per-layer steering vector in generation equals teacher-forced full passes
    steer = I.AddVector("resid_pre", jax.random.normal(jax.random.key(6), (3, CFG.d_model)), 2.0, per_layer=True)
    out = gen([steer])
    full_tokens = jnp.concatenate([t, jnp.asarray(out)], 1)
    full_mask = jnp.concatenate([k, jnp.ones_like(out)], 1)
    logits, _ = fwd(m, full_tokens, full_mask, [steer])
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, t.shape[1] - 1:-1], -1)), out)
    # a prompt-length cache leaves decode steps untouched instead of failing
    _, acts = fwd(m, t, k, capture=["mlp_out"])
    np.testing.assert_array_equal(gen([I.patch("mlp_out", acts["mlp_out"])]), plain)


def test_orthogonalized_weights_equal_directional_ablation(tiny):
    m, t, k = tiny
    r = jax.random.normal(jax.random.key(7), (CFG.d_model,))
    want, _ = fwd(orthogonalize(m, r), t, k)
    assert "unembed" in orthogonalize(m, r).params and not orthogonalize(m, r).cfg.tie_embeddings
    for sites in (I.RESID_SITES, ("embed", "attn_out", "mlp_out")):
        got, _ = fwd(m, t, k, I.directional_ablation(r, sites))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
    g = random_model(GPT2, jax.random.key(8))  # learned positions, LayerNorm, b_O / b_out biases, untied
    want, _ = fwd(orthogonalize(g, r), t, k)
    got, _ = fwd(g, t, k, I.directional_ablation(r))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


def test_errors():
    with pytest.raises(KeyError):
        I.AddVector("resid", jnp.zeros(4))
    with pytest.raises(InputError):
        I.AddVector("embed", jnp.zeros(4), layers=(0,))
    with pytest.raises(InputError):
        I.Where(steps="decode")
    with pytest.raises(InputError):
        I.ScaleHeads(jnp.ones(4), site="resid_pre")
    gemma = tiny_config("gemma2", vocab_size=40, n_layers=2, post_norms=True)
    with pytest.raises(InputError):
        orthogonalize(random_model(gemma, jax.random.key(0)), jnp.ones(32))
