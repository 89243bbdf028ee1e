"""Transcoders and attribution graphs on tiny random models: the replacement model reproduces the logits,
every kind of edge equals the effect of removing its source in a model whose patterns, norm scales and MLP
outputs are held at their clean values (by interventions on values: independent of the gradient-frozen forward
the graph is built with), transcoder training
through the SAE trainer, circuit-tracer's file formats, pruning and bad input."""

from __future__ import annotations

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
from saes.core import sae as sae_lib
from saes.circuits.attribution import attribute
from saes.circuits.feature_effects import held_norms_and_patterns
from saes.core.transcoders import TranscoderSet, random_set
from saes.io import circuit_tracer

TOKENS = np.array([1, 5, 9, 3, 7, 2, 11, 4, 13, 8, 21, 6, 17, 30, 12, 25, 10, 44, 19, 33])  # 20: three prefix buckets


def _transcoders(cfg, arch="relu", skip=False):
    """Random transcoders with a positive encoder bias (many active features) and a non-unit input scale
    (`skip`: skip transcoders, with a random linear path)."""
    return random_set(cfg, arch, 40, seed=10, bias=0.05, act_scale=1.3, skip_scale=1.0 if skip else None)


@pytest.mark.parametrize("arch,skip", [("llama", False), ("gpt2", False), ("gemma3", False), ("llama", True)])
def test_replacement_model_reproduces_the_logits(arch, skip):
    cfg = tiny_config(arch)
    m = random_model(cfg, jax.random.key(0))
    tcs = _transcoders(cfg, skip=skip)
    g = attribute(m, tcs, TOKENS)
    first = jnp.arange(len(TOKENS))[None] == 0
    clean = models.forward(m, TOKENS[None]).logits
    replaced = models.forward(m, TOKENS[None], interventions=(tcs.replace_mlps(error=jnp.asarray(g.errors)[:, None],
                                                                               keep=first),)).logits
    np.testing.assert_allclose(replaced, clean, atol=2e-5, rtol=0)
    without_error = models.forward(m, TOKENS[None], interventions=(tcs.replace_mlps(keep=first),)).logits
    assert float(jnp.abs(without_error - clean).max()) > 1e-3  # the error nodes are what make it exact


# ----------------------------------------------------------------------------- the value-level frozen model


class _Hold(eqx.Module):
    """At `site`: the clean value of the layer (`[L, B, T, ...]`) plus `delta` (same shape), plus with skip
    transcoders their linear path's change `(x - x_clean) @ W_skip` (x: the layer's ln2.normalized)."""

    clean: jax.Array
    delta: jax.Array
    W_skip: jax.Array | None
    clean_x: jax.Array | None
    site: str = eqx.field(static=True)

    def apply(self, value, ctx):
        out = self.clean[ctx.layer] + self.delta[ctx.layer]
        if self.W_skip is not None:
            out = out + (ctx.seen["ln2.normalized"] - self.clean_x[ctx.layer]) @ self.W_skip[ctx.layer]
        return out


class _Add(eqx.Module):
    delta: jax.Array
    site: str = eqx.field(static=True)

    def apply(self, value, ctx):
        return value + self.delta


def _frozen_by_value(m, tokens, W_skip=None):
    """`run(d_mlp [L, T, D], d_embed [T, D]) -> (ln2.normalized [L, T, D], final_norm [T, D])` of the model with
    patterns, norm scales (`held_norms_and_patterns`: interventions, no gradients involved) and MLP outputs
    held at their clean values (skip transcoders' `W_skip [L, D, D]`: plus their linear path, which stays live)."""
    held, final = held_norms_and_patterns(m, tokens[None])
    clean = models.forward(m, tokens[None], capture=("mlp_out", "ln2.normalized")).acts

    def run(d_mlp, d_embed):
        hold = _Hold(clean["mlp_out"], d_mlp[:, None], W_skip, clean["ln2.normalized"], "mlp_out")
        ivs = (_Add(d_embed[None], "embed"), *held, hold)
        acts = models.forward(m, tokens[None], capture=("ln2.normalized", "resid_post"), interventions=ivs).acts
        return acts["ln2.normalized"][:, 0], final(acts["resid_post"][-1])[0]

    return run


def check_edges_by_removal(m, g, run, W_enc, act_scale, write, sources) -> int:
    """For each source node in `sources`, remove it in the value-frozen model `run` (`_frozen_by_value`) and
    compare the change of every target (feature pre-activations `x . W_enc[l, :, f] * act_scale[l]`, demeaned
    logits) with minus the graph's column: rtol 1e-4. `write(l, p, f, a) -> [L, T, D]` is a feature's
    contribution to the MLP outputs. Returns how many sources had an effect above 1e-4."""
    L, T, D = g.errors.shape
    S, K = g.n_features, len(g.logit_tokens)
    off = g.node_offsets()
    zero_mlp, zero_emb = jnp.zeros((L, T, D)), jnp.zeros((T, D))
    emb = models.forward(m, TOKENS[None], capture=("embed",)).acts["embed"][0]
    W_U = m.params["unembed"]["W_U"] if "unembed" in m.params else m.params["embed"]["W_E"].T
    logit_vec = W_U[:, g.logit_tokens].T - W_U.mean(1)
    scale = jnp.reshape(act_scale, (L,))

    def target_values(x, f):
        """Every target's value: feature pre-activations (raw input . scaled encoder) and demeaned logits."""
        lay, pos, feat = g.active_features.T
        feats = jnp.sum(x[lay, pos] * W_enc[lay, :, feat] * scale[lay][:, None], -1)
        return jnp.concatenate([feats, logit_vec @ f[T - 1]])

    base = target_values(*run(zero_mlp, zero_emb))
    rows = np.concatenate([np.arange(S), np.arange(off["logit"], off["logit"] + K)])
    checked = 0
    for s in sources:
        d_mlp, d_emb = zero_mlp, zero_emb
        if s < off["error"]:
            l, p, f = (int(v) for v in g.active_features[s])
            d_mlp = -write(l, p, f, g.activation_values[s])
        elif s < off["token"]:
            l, p = divmod(int(s - off["error"]), T)
            d_mlp = d_mlp.at[l, p].set(-jnp.asarray(g.errors[l, p]))
        else:
            p = int(s - off["token"])
            d_emb = d_emb.at[p].set(-emb[p])
        change = np.asarray(target_values(*run(d_mlp, d_emb)) - base)
        predicted = -g.adjacency[rows, s]
        tol = max(np.abs(predicted).max(), 1e-3)
        np.testing.assert_allclose(change, predicted, atol=1e-5 * tol + 1e-6, rtol=1e-4)
        checked += int(np.abs(predicted).max() > 1e-4)
    return checked


@pytest.mark.parametrize("arch,tc_arch,skip", [("llama", "relu", False), ("gpt2", "jumprelu", False),
                                               ("llama", "topk", False), ("gpt2", "relu", True)])
def test_edges_equal_removing_the_source_in_the_value_frozen_model(arch, tc_arch, skip):
    """Every edge (into features and logits, from features, error nodes and token embeddings) equals the change
    of its target when its source is removed from the model with patterns, norms and MLP outputs held (a skip
    transcoder's linear path is part of the replacement model's frozen linear map: it stays live)."""
    cfg = tiny_config(arch)
    m = random_model(cfg, jax.random.key(1))
    tcs = _transcoders(cfg, tc_arch, skip)
    g = attribute(m, tcs, TOKENS, chunk=8, max_n_logits=3)
    L, T, D = g.errors.shape
    S, K = g.n_features, len(g.logit_tokens)
    off = g.node_offsets()
    assert S > 30 and g.adjacency.shape == (S + L * T + T + K,) * 2
    run = _frozen_by_value(m, jnp.asarray(TOKENS), tcs.stacked.W_skip)
    stacked = tcs.stacked
    rng = np.random.default_rng(0)
    sources = np.concatenate([rng.choice(S, 12, replace=False), off["error"] + rng.choice(L * T, 6, replace=False),
                              off["token"] + np.arange(T)])

    def write(l, p, f, a):  # a per-layer transcoder's feature writes into its own layer
        return jnp.zeros((L, T, D)).at[l, p].set(stacked.W_dec[l, f] * a / stacked.act_scale[l])

    checked = check_edges_by_removal(m, g, run, stacked.W_enc, stacked.act_scale, write, sources)
    assert checked >= 15  # most removed sources have effects: the comparison is not of zeros


def test_graph_prune_scores_and_json_schema(tmp_path):
    cfg = tiny_config("llama")
    m = random_model(cfg, jax.random.key(2))
    g = attribute(m, _transcoders(cfg), TOKENS, max_n_logits=4, desired_logit_prob=0.5)
    K = len(g.logit_tokens)
    assert 1 <= K <= 4 and np.all(np.diff(g.logit_probabilities) <= 0)
    assert np.all(g.adjacency[:, -K:] == 0)  # logits have no outputs
    off = g.node_offsets()
    assert np.all(g.adjacency[off["error"]:off["logit"]] == 0)  # errors and tokens have no inputs
    # features only receive from earlier layers (and never from position 0's features: there are none)
    lay = g.active_features[:, 0]
    A_ff = g.adjacency[: g.n_features, : g.n_features]
    assert np.all(A_ff[lay[:, None] <= lay[None, :]] == 0)
    assert np.all(g.active_features[:, 1] >= 1)
    loose, tight = g.prune(0.99, 0.99), g.prune(0.8, 0.98)
    for pr in (loose, tight):
        assert pr.node_mask[off["token"]:].all()  # tokens and logits stay
        kept = np.nonzero(pr.node_mask[: off["token"]])[0]  # features and errors keep an outgoing edge
        assert pr.edge_mask[:, kept].any(0).all()
        assert not pr.edge_mask[~pr.node_mask].any() and not pr.edge_mask[:, ~pr.node_mask].any()
    assert 0 < loose.node_mask[: off["error"]].sum() < g.n_features
    assert tight.node_mask.sum() < loose.node_mask.sum() and tight.edge_mask.sum() < loose.edge_mask.sum()
    sc = g.scores()
    assert 0 < sc["replacement"] < 1 and 0 < sc["completeness"] < 1
    doc = json.loads(g.to_json(tmp_path / "g.json", slug="t", node_threshold=0.99, edge_threshold=0.99).read_text())
    assert set(doc) == {"metadata", "qParams", "nodes", "links"}
    ids = {n["node_id"] for n in doc["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in doc["links"])
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    assert sum(n["is_target_logit"] for n in doc["nodes"]) == 1
    g.plot(tmp_path / "g.png", node_threshold=0.99, edge_threshold=0.99)
    assert (tmp_path / "g.png").stat().st_size > 5000


def test_partial_graph_keeps_the_most_influential_features():
    """`max_feature_nodes`: the first round takes the features of most influence through the logit rows alone,
    later rounds re-rank through every row so far; the partial graph is the full graph's sub-matrix on the kept
    nodes (rows and columns), and the chunking of targets does not change any edge."""
    from saes.circuits.attribution import _normalise

    cfg = tiny_config("llama")
    m = random_model(cfg, jax.random.key(2))
    tcs = _transcoders(cfg)
    full = attribute(m, tcs, TOKENS, max_n_logits=3)
    S, K = full.n_features, len(full.logit_tokens)
    assert S > 60 and full.n_active == S
    first = attribute(m, tcs, TOKENS, max_n_logits=3, max_feature_nodes=8, update_every=8, chunk=4)
    via_logits = full.logit_probabilities @ _normalise(full.adjacency[-K:].astype(np.float64))
    np.testing.assert_array_equal(np.sort(np.argsort(-via_logits[:S], kind="stable")[:8]),
                                  _indices(full, first.active_features))
    for n, every in ((8, 8), (30, 7), (S, 16)):
        part = attribute(m, tcs, TOKENS, max_n_logits=3, max_feature_nodes=n, update_every=every, chunk=8)
        assert part.n_features == n and part.n_active == S
        idx = _indices(full, part.active_features)
        assert np.all(np.diff(idx) > 0)
        keep = np.r_[idx, S:full.adjacency.shape[0]]
        np.testing.assert_allclose(part.adjacency, full.adjacency[np.ix_(keep, keep)], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(part.activation_values, full.activation_values[idx])
    none = attribute(m, tcs, TOKENS, max_n_logits=3, max_feature_nodes=0)
    assert none.n_features == 0 and none.adjacency.shape[0] == full.adjacency.shape[0] - S
    with pytest.raises(InputError, match="max_feature_nodes"):
        attribute(m, tcs, TOKENS, max_feature_nodes=-1)
    with pytest.raises(InputError, match="update_every"):
        attribute(m, tcs, TOKENS, max_feature_nodes=4, update_every=0)


def _indices(graph, features):
    """Row of each (layer, pos, feature) of `features` in `graph.active_features`."""
    rows = {tuple(f): i for i, f in enumerate(graph.active_features.tolist())}
    return np.asarray([rows[tuple(f)] for f in features.tolist()])


def test_circuit_tracer_format_round_trip(tmp_path):
    cfg = tiny_config("llama")
    for arch, skip in (("relu", False), ("jumprelu", False), ("relu", True)):
        tcs = _transcoders(cfg, arch, skip)
        out = tmp_path / f"{arch}-{skip}"
        back = circuit_tracer.read_transcoders(circuit_tracer.write(tcs, out))
        x = jax.random.normal(jax.random.key(3), (5, cfg.d_model))
        assert back.skip == skip
        for a, b in zip(tcs.transcoders, back.transcoders):
            assert (b.site, b.target, b.layer, b.arch) == (a.site, a.target, a.layer, a.arch)
            np.testing.assert_allclose(b(x), a(x), atol=1e-5)
            if skip:
                assert float(jnp.abs(a.skip(x)).max()) > 0.1  # the skip path is a real part of the prediction
        text = (out / "config.yaml").read_text()
        assert "mlp.hook_in" in text and "mlp.hook_out" in text and "transcoder_set" in text
    with pytest.raises(InputError, match="circuit-tracer reads"):
        circuit_tracer.write(_transcoders(cfg, "topk"), tmp_path / "topk")


def test_bad_input_is_named():
    cfg = tiny_config("llama")
    m = random_model(cfg, jax.random.key(0))
    tcs = _transcoders(cfg)
    with pytest.raises(InputError, match="outside this model's vocabulary"):
        attribute(m, tcs, np.array([1, 2, 999]))
    with pytest.raises(InputError, match="skip_first"):
        attribute(m, tcs, np.array([1, 2]), skip_first=2)
    with pytest.raises(InputError, match="dense adjacency, rows and source vectors need"):
        attribute(m, tcs, TOKENS, max_gib=1e-6)
    with pytest.raises(InputError, match="logit tokens"):
        attribute(m, tcs, TOKENS, logit_tokens=[64])
    with pytest.raises(InputError, match="one transcoder for each layer"):
        TranscoderSet.of(tcs.transcoders[1:])
    with pytest.raises(InputError, match=r"skip\) = \(.*True\), layer 0 is \(.*False\)"):  # no mixing
        TranscoderSet.of([*tcs.transcoders[:1], *_transcoders(cfg, skip=True).transcoders[1:]])
    with pytest.raises(InputError, match="3 layers, the model 2"):
        attribute(random_model(tiny_config("gpt2"), jax.random.key(0)), tcs, TOKENS)
    with pytest.raises(InputError, match="an SAE"):
        TranscoderSet.of([sae_lib.init("relu", 32, 8, jax.random.key(0), site="resid_post", layer=0)])
    with pytest.raises(InputError, match="--target"):
        saes.TrainConfig(site=("ln2.normalized",), target="resid_pre")
    with pytest.raises(InputError, match="computed before"):
        saes.TrainConfig(site=("resid_post",), target="mlp_out")


class _Rows:
    """Random token rows (what `saes.train.data.TokenRows` yields) for a tokenizer-less model."""

    context = 16

    def rows(self, start=0):
        rng = np.random.default_rng(start)
        while True:
            yield rng.integers(2, 64, self.context).astype(np.int32)

    def take(self, n, start=0):
        return np.stack([r for r, _ in zip(self.rows(start), range(n))])


def test_transcoders_train_on_every_layer_in_one_pass(tmp_path):
    cfg = tiny_config("llama")
    m = random_model(cfg, jax.random.key(0))
    layers = tuple(range(cfg.n_layers))
    tc = saes.TrainConfig(site=("ln2.normalized",), target="mlp_out", layers=layers, arch="relu", width=96,
                          tokens=256 * 60, batch_size=256, chunk_tokens=2048, lr=3e-3, lr_warmup_steps=5,
                          sparsity_coeff=0.5, progress=False, log_every=10, eval_every=0, checkpoint_every=1000,
                          out=str(tmp_path / "run"))
    hooks = saes.train.data.parse_hooks(tc.site, layers) + [models.Hook("mlp_out", l) for l in layers]
    source = saes.ModelSource(m, hooks, _Rows(), chunk_tokens=2048, model_batch=16)
    run = saes.fit(tc, source=source, model=m, eval_tokens=_Rows().take(4, 99))
    assert sorted(run.saes) == [f"L{l}.ln2.normalized" for l in layers]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in metrics if "eval" not in r]
    for l in layers:
        first, last = train[0][f"L{l}.ln2.normalized"], train[-1][f"L{l}.ln2.normalized"]
        # it learnt to predict mlp_out (a random MLP on random tokens: about 0.35 after 60 steps, from 0.01)
        assert last["explained_variance"] > max(0.25, first["explained_variance"] + 0.2)
    loaded = saes.load_run(tmp_path / "run")
    tcs = TranscoderSet.of(loaded.values())
    assert tcs.target == "mlp_out" and tcs.site == "ln2.normalized"
    ce = tcs.ce_metrics(m, _Rows().take(16, 7))
    # (CE recovered means little for a random model on random tokens: its CE is near uniform either way)
    assert np.isfinite(list(ce.values())).all() and ce["kl"] < 0.7 * ce["kl_zero"], ce
    final_eval = [r for r in metrics if "eval" in r][-1]["eval"]
    assert set(final_eval) == set(run.saes)  # each transcoder spliced at mlp_out, one at a time
    with pytest.raises(InputError, match="transcoder"):
        saes.to_saelens(run.saes["L0.ln2.normalized"], tmp_path / "sl")


def _linear_plus_sparse_source(d=16, n=2048, seed=0):
    """`L0.ln2.normalized` x ~ N(0, 1) and `L0.mlp_out` y = x @ M + a sparse nonlinear part (ReLU of 4
    random directions): a dense full-rank linear map that a skip path learns and a sparse dictionary can not."""
    kM, kR, kU = jax.random.split(jax.random.key(seed), 3)
    M = jax.random.normal(kM, (d, d)) / d**0.5
    R, U = jax.random.normal(kR, (d, 4)), jax.random.normal(kU, (4, d))
    R, U = R / jnp.linalg.norm(R, axis=0), U / jnp.linalg.norm(U, axis=1, keepdims=True)

    def make(i):
        x = jax.random.normal(jax.random.fold_in(jax.random.key(seed + 1), i), (n, d))
        return {"L0.ln2.normalized": x, "L0.mlp_out": x @ M + jax.nn.relu(x @ R - 0.5) @ U}

    return saes.train.data.ArraySource(make, ("L0.ln2.normalized", "L0.mlp_out"), {"L0.ln2.normalized": d, "L0.mlp_out": d})


def test_skip_transcoder_learns_the_linear_path(tmp_path):
    """A skip transcoder (`--skip`) trains its `W_skip` with the rest: on a target that is mostly linear in the
    input it explains far more variance than the same transcoder without the path, and saves and loads with it."""
    ev = {}
    for skip in (False, True):
        tc = saes.TrainConfig(site=("ln2.normalized",), target="mlp_out", layers=(0,), arch="topk", k=4, width=32,
                              skip=skip, tokens=512 * 150, batch_size=512, chunk_tokens=2048, lr=1e-2,
                              lr_warmup_steps=5, progress=False, log_every=10, eval_every=0, checkpoint_every=1000,
                              out=str(tmp_path / f"run-{skip}"))
        run = saes.fit(tc, source=_linear_plus_sparse_source())
        last = [json.loads(x) for x in (tmp_path / f"run-{skip}" / "metrics.jsonl").read_text().splitlines()][-1]
        ev[skip] = last["L0.ln2.normalized"]["explained_variance"]
    assert ev[True] > 0.95 and ev[True] > ev[False] + 0.1, ev
    loaded = saes.load_run(tmp_path / "run-True")["L0.ln2.normalized"]
    assert loaded.config()["skip"] and loaded.W_skip.shape == (16, 16)
    x = _linear_plus_sparse_source().make(5)["L0.ln2.normalized"][:8]
    np.testing.assert_allclose(loaded(x), run.saes["L0.ln2.normalized"](x), atol=1e-6)
    with pytest.raises(InputError, match="--skip needs --target"):
        saes.TrainConfig(site=("ln2.normalized",), skip=True)
    with pytest.raises(ValueError, match="needs a target"):
        sae_lib.init("relu", 8, 4, jax.random.key(0), skip=True)
