"""Cross-layer transcoders on tiny random models: the replacement model (features carried forward layer by
layer, plus the graph's error nodes) reproduces the logits; every attribution edge equals the effect of removing
its source (a feature's writes into every later layer) in the value-frozen model; training in one pass through
the SAE trainer learns writes a per-layer transcoder can not make; our format and circuit-tracer's round-trip."""

from __future__ import annotations

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import saes
from models.testing import random_model, tiny_config
from models.errors import InputError
from saes.core import cross_layer
from saes.circuits.attribution import attribute
from saes.core.cross_layer import random_clt
from saes.io import circuit_tracer, formats
from tests.saes.test_attribution import TOKENS, _frozen_by_value, check_edges_by_removal


def _clt(cfg, arch="relu", **kw):
    return random_clt(cfg, arch, 40, seed=10, bias=0.05, act_scale=1.3, dec_scale=0.7, threshold=0.02, k=6, **kw)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_replacement_model_reproduces_the_logits(arch):
    cfg = tiny_config(arch)
    m = random_model(cfg, jax.random.key(0))
    clt = _clt(cfg)
    g = attribute(m, clt, TOKENS, max_n_logits=3)
    clean = models.forward(m, TOKENS[None]).logits
    replaced = clt.replaced_logits(m, TOKENS[None], error=jnp.asarray(g.errors)[:, None])
    np.testing.assert_allclose(replaced, clean, atol=2e-5, rtol=0)
    assert float(jnp.abs(clt.replaced_logits(m, TOKENS[None]) - clean).max()) > 1e-3  # the error nodes make it exact
    # a feature's writes reach later layers: without them (decoders cut to the own layer) the prediction differs
    own = eqx.tree_at(lambda c: c.W_dec, clt, clt.W_dec * jnp.eye(cfg.n_layers)[:, None, :, None])
    assert float(jnp.abs(own.replaced_logits(m, TOKENS[None], error=jnp.asarray(g.errors)[:, None]) - clean).max()) > 1e-3


@pytest.mark.parametrize("arch,clt_arch", [("llama", "relu"), ("gpt2", "jumprelu"), ("llama", "topk")])
def test_edges_equal_removing_the_source_in_the_value_frozen_model(arch, clt_arch):
    """Every edge into features and logits, from features (all their writes), error nodes and tokens, equals
    the change of its target when its source is removed with patterns, norms and MLP outputs held."""
    cfg = tiny_config(arch)
    m = random_model(cfg, jax.random.key(1))
    clt = _clt(cfg, clt_arch)
    g = attribute(m, clt, TOKENS, chunk=8, max_n_logits=3)
    L, T, D = g.errors.shape
    S, K = g.n_features, len(g.logit_tokens)
    off = g.node_offsets()
    assert S > 30 and g.adjacency.shape == (S + L * T + T + K,) * 2
    run = _frozen_by_value(m, jnp.asarray(TOKENS))
    rng = np.random.default_rng(0)
    early = np.nonzero(g.active_features[:, 0] < L - 1)[0]  # features that write to later layers too
    sources = np.concatenate([rng.choice(early, 10, replace=False), rng.choice(S, 4, replace=False),
                              off["error"] + rng.choice(L * T, 4, replace=False), off["token"] + np.arange(0, T, 3)])

    def write(l, p, f, a):  # a CLT feature writes into its layer and every later one
        return jnp.zeros((L, T, D)).at[:, p].set(clt.decoder_vectors(l, f) * a)

    checked = check_edges_by_removal(m, g, run, clt.W_enc, clt.act_scale, write, sources)
    assert checked >= 15


def test_formats_round_trip(tmp_path):
    cfg = tiny_config("llama")
    for arch in cross_layer.ARCHS:
        clt = _clt(cfg, arch)
        x = jax.random.normal(jax.random.key(2), (5, cfg.n_layers, cfg.d_model))
        back = formats.load_clt(formats.save_clt(clt, tmp_path / arch, meta={"note": 1}), cfg)
        assert back.config() == clt.config()
        np.testing.assert_allclose(back(x), clt(x), atol=1e-6)
        if arch == "topk":
            with pytest.raises(InputError, match="no equivalent"):
                circuit_tracer.write(clt, tmp_path / "ct-topk")
            continue
        ct = circuit_tracer.read_clt(circuit_tracer.write(clt, tmp_path / f"ct-{arch}"))
        assert (ct.arch, ct.site, ct.target) == (arch, "ln2.normalized", "mlp_out")
        np.testing.assert_allclose(ct(x), clt(x), atol=1e-5)
        np.testing.assert_allclose(ct.encode(x), clt.encode(x), atol=1e-5)
        assert np.asarray(ct.act_scale).tolist() == [[1.0]] * cfg.n_layers  # folded
    with pytest.raises(InputError, match="layers"):
        formats.load_clt(tmp_path / "relu", tiny_config("llama", n_layers=2))
    with pytest.raises(InputError, match=r"layer 3 outside \[0, 3\)"):
        clt.decoder_vectors(3, 0)
    with pytest.raises(InputError, match=r"feature 40 outside \[0, 40\)"):
        clt.decoder_vectors(0, 40)
    with pytest.raises(InputError, match="layer"):
        clt.layer_encode(jnp.zeros((2, cfg.d_model)), -1)
    m = random_model(cfg, jax.random.key(0))
    from saes.circuits.feature_effects import FeatureEdits
    for bad, kw, match in ((TOKENS[None] + 1000, {}, "vocabulary"), (TOKENS, {}, r"\[B, T\]"),
                           (TOKENS[None], dict(error=jnp.zeros((1, 1, 20, 32))), "error has shape"),
                           (TOKENS[None], dict(edits=FeatureEdits.of([(0, 25, 1, 0.0)])), "pos")):
        with pytest.raises(InputError, match=match):
            clt.replaced_logits(m, bad, **kw)
    (tmp_path / "relu" / "clt.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(InputError, match="truncated or corrupt"):
        formats.load_clt(tmp_path / "relu")
    from safetensors.numpy import load_file, save_file
    f = tmp_path / "ct-relu" / "W_dec_1.safetensors"
    save_file({"W_dec_1": load_file(str(f))["W_dec_1"][:, :1]}, str(f))
    with pytest.raises(InputError, match="W_dec_1 has shape"):
        circuit_tracer.read_clt(tmp_path / "ct-relu")


def _two_layer_source(d=16, n=2048, seed=0):
    """Layer 0's input x0 ~ N(0, 1) drives sparse features (ReLU of 6 directions) written to BOTH layers' targets;
    layer 1's input is independent noise: only a write from layer 0 into layer 1 can predict layer 1's target."""
    kR, kU = jax.random.split(jax.random.key(seed))
    R = jax.random.normal(kR, (d, 6))
    R = R / jnp.linalg.norm(R, axis=0)
    U = jax.random.normal(kU, (2, 6, d)) / d**0.5 * 3

    def make(i):
        x0, x1 = jax.random.normal(jax.random.fold_in(jax.random.key(seed + 1), i), (2, n, d))
        h = jax.nn.relu(x0 @ R - 0.5)
        return {"L0.ln2.normalized": x0, "L1.ln2.normalized": x1, "L0.mlp_out": h @ U[0], "L1.mlp_out": h @ U[1]}

    names = ("L0.ln2.normalized", "L1.ln2.normalized", "L0.mlp_out", "L1.mlp_out")
    return saes.train.data.ArraySource(make, names, {h: d for h in names})


def test_cross_layer_training_learns_writes_into_later_layers(tmp_path):
    """`TrainConfig(cross_layer=True)`: one CLT for both layers, trained jointly; on data whose layer-1 target
    depends only on layer 0's input it explains most of the variance, per-layer transcoders about half; the run
    saves, loads and resumes like any other."""
    ev = {}
    for cross in (True, False):
        tc = saes.TrainConfig(site=("ln2.normalized",), target="mlp_out", layers=(0, 1), arch="relu", width=32,
                              cross_layer=cross, tokens=512 * 150, batch_size=512, chunk_tokens=2048, lr=1e-2,
                              sparsity_coeff=0.05, lr_warmup_steps=5, progress=False, log_every=10, eval_every=0,
                              checkpoint_every=1000, out=str(tmp_path / f"run-{cross}"))
        saes.fit(tc, source=_two_layer_source())
        last = [json.loads(x) for x in (tmp_path / f"run-{cross}" / "metrics.jsonl").read_text().splitlines()][-1]
        ev[cross] = (last["clt"]["explained_variance"] if cross else
                     np.mean([last[f"L{l}.ln2.normalized"]["explained_variance"] for l in (0, 1)]))
    print("explained variance (cross-layer, per-layer):", ev)
    assert ev[True] > 0.8 and ev[True] > ev[False] + 0.3, ev
    loaded = saes.load_run(tmp_path / "run-True")["clt"]
    assert isinstance(loaded, cross_layer.CrossLayerTranscoder) and loaded.W_dec.shape == (2, 32, 2, 16)
    assert float(jnp.abs(loaded.W_dec[1, :, 0]).max()) == 0.0  # nothing writes backwards
    with pytest.raises(InputError, match="--cross-layer needs --target"):
        saes.TrainConfig(site=("ln2.normalized",), cross_layer=True)
    with pytest.raises(InputError, match="--arch"):
        saes.TrainConfig(site=("ln2.normalized",), target="mlp_out", cross_layer=True, arch="gated")
    cfg = tiny_config("llama")
    with pytest.raises(InputError, match="every layer"):
        saes.train.config.validate(saes.TrainConfig(site=("ln2.normalized",), target="mlp_out", layers=(0, 1),
                                                    context=16, cross_layer=True), cfg)


def test_real_model_edit_writes_the_decoder_into_every_later_layer():
    """`FeatureEffects.real` with a CLT adds the feature's decoder vectors (times the change) at mlp_out of its
    layer and every later one; `check_edges` runs on a CLT graph."""
    from saes.circuits.feature_effects import FeatureEdits, FeatureEffects, check_edges
    from tests.saes.test_feature_effects import AddPerLayer

    cfg = tiny_config("llama")
    m = random_model(cfg, jax.random.key(1))
    clt = _clt(cfg)
    g = attribute(m, clt, TOKENS, max_n_logits=3)
    fx = FeatureEffects.of(m, clt, TOKENS)
    l, p, f = (int(x) for x in g.active_features[0])
    assert l == 0
    a = float(fx.acts[l, p, f])
    pre, logits = fx.real(FeatureEdits.of([(l, p, f, 3 * a)]))
    delta = jnp.zeros((cfg.n_layers, 1, len(TOKENS), cfg.d_model)).at[:, 0, p].set(clt.decoder_vectors(l, f) * 2 * a)
    assert float(jnp.abs(delta[-1]).max()) > 0

    out = models.forward(m, TOKENS[None], capture=("ln2.normalized",), interventions=(AddPerLayer(delta),))
    np.testing.assert_allclose(logits, out.logits[0, -1], atol=1e-5)
    x = jnp.swapaxes(out.acts["ln2.normalized"][:, 0], 0, 1)
    np.testing.assert_allclose(pre, jnp.swapaxes(clt.pre_acts(x * clt.act_scale), 0, 1), atol=1e-5)
    r = check_edges(g, fx, n_edges=25)
    assert r.spearman("total", "local") > 0.8, r


def test_topk_training_loss_equals_the_dense_formulation():
    """TopK's training loss decodes the active rows only (`sparse_decode`); its value and gradients equal the
    dense contraction through the causal mask."""
    cfg = tiny_config("llama")
    clt = dataclasses.replace(_clt(cfg, "topk"), k=1)  # width 40 >= 24 k: the sparse path
    xn, yn = jax.random.normal(jax.random.key(3), (2, 64, cfg.n_layers, cfg.d_model))

    def dense(c):
        y_hat = c.decode_normalised(c.activate(c.pre_acts(xn)))
        return jnp.mean(jnp.sum(jnp.square(yn - y_hat), (-2, -1)))

    sparse = lambda c: c.loss(xn, 0.0, None, yn=yn)[0]  # noqa: E731
    params, static = eqx.partition(clt, eqx.is_inexact_array)
    join = lambda p: eqx.combine(p, static)  # noqa: E731
    np.testing.assert_allclose(sparse(clt), dense(clt), rtol=1e-5)
    g_sparse = jax.grad(lambda p: sparse(join(p)))(params)
    g_dense = jax.grad(lambda p: dense(join(p)))(params)
    causal = clt.causal()[:, None, :, None]
    for name in ("W_enc", "b_enc", "b_dec"):
        np.testing.assert_allclose(getattr(g_sparse, name), getattr(g_dense, name), rtol=1e-4, atol=1e-5)
    # below the source layer the sparse gradient is not masked: `constrain` zeroes those entries after each step
    np.testing.assert_allclose(g_sparse.W_dec * causal, g_dense.W_dec, rtol=1e-4, atol=1e-5)
    aux = clt.loss(xn, 0.0, None, yn=yn)[1]
    f = clt.activate(clt.pre_acts(xn))
    np.testing.assert_array_equal(aux["fires"], (f > 0).sum(0))
    np.testing.assert_allclose(aux["l0"], (f > 0).sum(-1).mean(), rtol=1e-6)
