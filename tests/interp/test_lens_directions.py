"""Lenses, direct logit attribution, residual decomposition, direction arithmetic and the heatmap, on tiny models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from interp import directions as Dn
from interp import interventions as I
from interp import lens, plot, positions
from interp.readout import Projection, run_readout
from models.testing import random_model, tiny_config

LLAMA = tiny_config("llama", vocab_size=40)
GPT2 = tiny_config("gpt2", vocab_size=40, act="gelu", tie_embeddings=False)
TOKENS = jax.random.randint(jax.random.key(1), (3, 7), 0, 40)
MASK = jnp.asarray([[1] * 7, [0] + [1] * 6, [0, 0, 0] + [1] * 4])


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return random_model({"llama": LLAMA, "gpt2": GPT2}[request.param], jax.random.key(0))


def test_decomposition_sums_to_final_residual(model):
    dec = lens.residual_decomposition(model, TOKENS, MASK, positions=None)
    np.testing.assert_allclose(np.asarray(dec.total()), np.asarray(dec.resid), atol=2e-5)
    np.testing.assert_allclose(np.asarray(dec.heads.sum(3) + dec.attn_bias[:, None, None]), np.asarray(dec.attn_out),
                               atol=2e-5)


def test_dla_and_logit_lens(model):
    logits, _ = models.forward(model, TOKENS, MASK)
    dla = lens.direct_logit_attribution(model, TOKENS, MASK, lens.unembed_direction(model, [3, 4, 5], [6, 7, 8]))
    want = logits[:, -1, jnp.asarray([3, 4, 5])] - logits[:, -1, jnp.asarray([6, 7, 8])]
    np.testing.assert_allclose(np.asarray(dla.total()), np.diagonal(np.asarray(want)), atol=1e-4)
    np.testing.assert_allclose(np.asarray(dla.heads.sum(2) + dla.attn_bias), np.asarray(dla.attn), atol=1e-4)
    single = lens.direct_logit_attribution(model, TOKENS, MASK, lens.unembed_direction(model, 3))
    np.testing.assert_allclose(np.asarray(single.total()), np.asarray(logits[:, -1, 3]), atol=1e-4)
    lensed = lens.logit_lens(model, TOKENS, MASK, positions=(-1, 2))
    assert lensed.shape == (model.cfg.n_layers, 3, 2, 40)
    np.testing.assert_allclose(np.asarray(lensed[-1, :, 0]), np.asarray(logits[:, -1]), atol=1e-4)


def test_vector_operations():
    rng = np.random.default_rng(0)
    a, b, c = (jnp.asarray(rng.normal(size=16), jnp.float32) for _ in range(3))
    assert float(jnp.linalg.norm(Dn.normalize(a))) == pytest.approx(1.0, abs=1e-6)
    assert float(Dn.component(Dn.remove_component(a, b), b)) == pytest.approx(0.0, abs=1e-5)
    o = Dn.orthogonalize(a, b, c)
    assert abs(float(o @ b)) < 1e-4 and abs(float(o @ c)) < 1e-4
    assert float(Dn.cosine(a, 3 * a)) == pytest.approx(1.0, abs=1e-6)
    cm = Dn.cosine_matrix(jnp.stack([a, -a, b]))
    np.testing.assert_allclose(np.diag(cm), 1.0, atol=1e-6)
    assert float(cm[0, 1]) == pytest.approx(-1.0, abs=1e-6)
    np.testing.assert_allclose(Dn.combine(jnp.stack([a, a])), Dn.normalize(a), atol=1e-6)
    planted = Dn.normalize(a)
    x = rng.normal(size=(200, 16)) * 0.1 + rng.normal(size=(200, 1)) * 3 * np.asarray(planted) + np.asarray(planted)
    comps, ratio = Dn.pca(jnp.asarray(x, jnp.float32), 2)
    assert abs(float(comps[0] @ planted)) > 0.99 and float(ratio[0]) > 0.9


def test_diff_of_means_one_pass_and_score_directions():
    m = random_model(LLAMA, jax.random.key(0))
    ta, ma = np.asarray(TOKENS), np.asarray(MASK)
    tb = np.asarray(jax.random.randint(jax.random.key(2), (2, 5), 0, 40))
    mb = np.asarray([[1] * 5, [0] + [1] * 4])
    sel = positions.FromEnd(-1, -2)
    diff = Dn.diff_of_means(m, (ta, ma), (tb, mb), sel)
    assert diff.shape == (LLAMA.n_layers, 2, LLAMA.d_model)
    mean = lambda t, k: positions.gather(models.forward(m, t, k, capture=["resid_pre"])[1]["resid_pre"],
                                         sel(t, k), seq_axis=2).mean(1)
    np.testing.assert_allclose(np.asarray(diff), np.asarray(mean(ta, ma) - mean(tb, mb)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(Dn.mean_activations(m, ta, ma, sel, batch_size=2)), np.asarray(mean(ta, ma)),
                               atol=1e-5)
    # score every (layer, position) candidate by ablation and by addition, against single runs
    cands, layers = diff.reshape(-1, LLAMA.d_model), np.repeat(np.arange(LLAMA.n_layers), 2)
    metric = Projection(cands[0])
    abl, add = Dn.score_directions(m, cands, layers, metric, (ta, ma), (tb, mb))
    for i in (0, 3, 5):
        one_abl = metric(run_readout(m, ta, ma, I.directional_ablation(cands[i])))
        one_add = metric(run_readout(m, tb, mb, (I.AddVector("resid_pre", cands[i], layers=(int(layers[i]),)),)))
        np.testing.assert_allclose([abl[i], add[i]], [float(one_abl), float(one_add)], atol=2e-5)
    assert abs(abl[0]) < 1e-4  # ablating the metric's own direction zeroes it


def test_heatmap(tmp_path):
    path = tmp_path / "heads.png"
    fig = plot.heatmap(np.arange(12.0).reshape(3, 4) - 5, title="t", path=str(path))
    assert path.stat().st_size > 1000 and fig.axes
    with pytest.raises(ValueError):
        plot.heatmap(np.zeros(3))
