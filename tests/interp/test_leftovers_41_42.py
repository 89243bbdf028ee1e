"""Leftovers of issues 41 (item 11) and 42: float token ids and 0/1-only masks, intervention vector widths and
TransformerLens / run-key names as intervention sites, SAE training config checks before the model loads, head
ablation results as `HeadGrid`, the SAELens export's Hugging Face `model_name`, `Graph` repr / prune / plot, and
`models.load(mesh=)` fitting the mesh before reading weights. Tiny random models only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from interp import interventions as iv
from models.testing import random_model, tiny_config
from models.errors import InputError
from models.sites import Hook

CFG = tiny_config("llama", vocab_size=40)
TOKENS = np.asarray(jax.random.randint(jax.random.key(1), (2, 6), 0, 40), np.int32)
MASK = np.asarray([[1] * 6, [0, 0] + [1] * 4])


@pytest.fixture(scope="module")
def tiny():
    return random_model(CFG, jax.random.key(0))


# ------------------------------------------------------------------------------------- 1. tokens and masks


def test_float_token_ids_are_an_input_error_naming_tokens(tiny):
    with pytest.raises(InputError, match="tokens.*integer.*float32"):
        models.forward(tiny, TOKENS.astype(np.float32), MASK)
    with pytest.raises(InputError, match="tokens"):  # traced float ids: the dtype is checked at trace time too
        jax.jit(lambda t: models.forward(tiny, t).logits)(jnp.asarray(TOKENS, jnp.float32))


@pytest.mark.parametrize("bad", [2, -1, 0.5])
def test_a_mask_not_zero_one_is_an_input_error_naming_attention_mask(tiny, bad):
    mask = MASK.astype(np.float32)
    mask[0, 3] = bad
    with pytest.raises(InputError, match="attention_mask.*0.*1"):
        models.forward(tiny, TOKENS, mask)


def test_valid_masks_of_any_dtype_pass_and_traced_masks_are_skipped(tiny):
    ref = np.asarray(models.forward(tiny, TOKENS, MASK).logits)
    for m in (MASK.astype(bool), MASK.astype(np.float32), jnp.asarray(MASK, jnp.int32)):
        np.testing.assert_allclose(np.asarray(models.forward(tiny, TOKENS, m).logits), ref, atol=1e-6)
    # under the caller's jit the mask is traced: no check, no tracing error
    out = jax.jit(lambda m: models.forward(tiny, TOKENS, m).logits)(jnp.asarray(MASK))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


# ------------------------------------------------------------------------------------- 2. interventions


@pytest.mark.parametrize("make, field", [
    (lambda v: iv.AddVector("resid_post", v, layers=(1,)), "vector"),
    (lambda v: iv.project_out("resid_mid", v), "direction"),
    (lambda v: iv.AddVectorPerExample("resid_post", v, np.ones((2, 3))), "vector"),
])
def test_a_vector_of_the_wrong_width_names_the_site_and_both_widths(tiny, make, field):
    bad = make(np.ones(CFG.d_model + 3, np.float32))
    with pytest.raises(InputError, match=rf"{field} has width 35.*site '[a-z_]+' has width 32"):
        models.forward(tiny, TOKENS, MASK, interventions=(bad,))
    good = make(np.ones(CFG.d_model, np.float32))
    assert np.isfinite(np.asarray(models.forward(tiny, TOKENS, MASK, interventions=(good,)).logits)).all()


def test_a_wrong_width_is_an_input_error_at_trace_time_too():
    """Callers that skip `validate` (the pure core) get the same error when the edit is traced."""
    from models.transformer import SiteContext
    bad = iv.AddVector("mlp.post", np.ones(5))
    with pytest.raises(InputError, match="vector has width 5.*'mlp.post' has width 48"):
        bad.edit(jnp.zeros((2, 6, 48)), SiteContext(0, None, None, 0))


@pytest.mark.parametrize("name", ["blocks.1.hook_resid_post", "L1.resid_post"])
def test_tl_names_and_run_keys_are_intervention_sites(tiny, name):
    v = np.linspace(-1, 1, CFG.d_model).astype(np.float32)
    ref = iv.AddVector("resid_post", v, layers=(1,))
    got = iv.AddVector(name, v)
    assert got.site == "resid_post" and tuple(got.where.layers) == (1,)
    a = models.forward(tiny, TOKENS, MASK, interventions=(ref,)).logits
    b = models.forward(tiny, TOKENS, MASK, interventions=(got,)).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert iv.at(name) == iv.at(Hook("resid_post", 1))
    with pytest.raises(InputError, match="Hook names the layer"):
        iv.AddVector(name, v, layers=(2,))
    with pytest.raises(InputError, match="blocks.1.hook_nothing"):
        iv.AddVector("blocks.1.hook_nothing", v)


# ------------------------------------------------------------------------------------- 3. SAE training config


def test_sae_dtype_is_checked_when_the_config_is_built():
    from saes.train.config import TrainConfig
    with pytest.raises(InputError, match="dtype.*float7"):
        TrainConfig(dtype="float7")
    assert TrainConfig(dtype="bfloat16").dtype == "bfloat16"


def test_feature_parallel_beyond_the_devices_fails_before_the_model_loads(tmp_path, monkeypatch):
    from saes.train import loop as train_mod
    from saes.train.config import TrainConfig, check_devices

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the device check")

    monkeypatch.setattr(train_mod, "_load_model", no_load)
    n = jax.device_count()
    cfg = TrainConfig(feature_parallel=n + 2, out=str(tmp_path))
    with pytest.raises(InputError, match=rf"--feature-parallel {n + 2}.*{n}"):
        train_mod.train(cfg)
    with pytest.raises(InputError, match="--feature-parallel 2 x --data-parallel 3"):
        check_devices(TrainConfig(feature_parallel=2, data_parallel=3), 4)
    check_devices(TrainConfig(feature_parallel=2), 4)  # data_parallel 0 takes the 2 left
    check_devices(TrainConfig(feature_parallel=1), 1)


# ------------------------------------------------------------------------------------- 4. head sweeps


def test_head_ablation_returns_a_head_grid_that_computes_as_its_array(tiny):
    from interp import sweeps
    from interp.heads import HeadGrid
    from interp.readout import LogitDiff

    metric = LogitDiff(np.asarray([3, 4]), np.asarray([5, 6]))
    exact = sweeps.head_ablation(tiny, TOKENS, MASK, metric, progress=False)
    approx = sweeps.head_ablation_attribution(tiny, TOKENS, MASK, metric)
    for g in (exact, approx):
        assert isinstance(g, HeadGrid) and g.shape == (CFG.n_layers, CFG.n_heads)
        assert "zero ablation of LogitDiff" in g.name and "3 layers x 4 heads" in repr(g) and "\n" not in repr(g)
    assert exact.top(1)[0][0] == "L{}H{}".format(*np.unravel_index(np.argmax(np.abs(exact)), exact.shape))
    # the array reads every caller used: operators, ufuncs, ndarray methods, indexing, numpy functions
    diff = exact - approx
    assert type(diff) is np.ndarray and diff.shape == (3, 4)
    np.testing.assert_array_equal(diff, np.asarray(exact) - np.asarray(approx))
    assert exact.ravel().shape == (12,) and len(exact.tolist()) == 3 and exact.max() == np.asarray(exact).max()
    assert np.abs(exact).dtype == np.float64 and exact[1, 2] == np.asarray(exact)[1, 2] and len(exact) == 3
    # the values are the sweep's own: the same as one forward per head
    from interp import interventions as I
    from interp.readout import run_readout
    base = float(metric(run_readout(tiny, TOKENS, MASK)))
    one = float(metric(run_readout(tiny, TOKENS, MASK, (I.zero_heads(CFG, [(1, 2)]),)))) - base
    assert exact[1, 2] == pytest.approx(one, abs=2e-5)


# ------------------------------------------------------------------------------------- 5. SAELens export


def test_saelens_export_names_the_hugging_face_model(tmp_path):
    import json

    import saes
    from models.loading import HF_IDS, REGISTRY

    sae = saes.init("relu", 12, 20, jax.random.key(0), site="resid_post", layer=3)
    assert set(REGISTRY) == set(HF_IDS)  # every registered model has its Hugging Face id
    for name, want in (("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                       ("gemma-3-270m", "google/gemma-3-270m"), ("some/local_dir", "some/local_dir")):
        saes.to_saelens(sae, tmp_path / name.replace("/", "_"), model_name=name, prepend_bos=True)
        meta = json.loads((tmp_path / name.replace("/", "_") / "cfg.json").read_text())["metadata"]
        assert meta["model_name"] == want and meta["interp_model"] == name


# ------------------------------------------------------------------------------------- 6. attribution graphs


def test_graph_repr_prune_masks_and_plot_labels(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from models.testing import tiny_config
    from saes.circuits.attribution import Graph, Pruned, attribute
    from saes.core.transcoders import random_set

    cfg = tiny_config("llama")
    m = random_model(cfg, jax.random.key(0))
    tcs = random_set(cfg, "relu", 40, seed=10, bias=0.05, act_scale=1.3)
    tokens = np.array([1, 5, 9, 3, 7, 2])
    g = attribute(m, tcs, tokens, max_n_logits=3, desired_logit_prob=0.99)
    r = repr(g)
    assert "\n" not in r and len(r) < 300, r
    n_edges = int(np.count_nonzero(g.adjacency))
    assert "prompt of 6 tokens [1 5 9 3 7 2]" in r, r
    assert (f"{g.adjacency.shape[0]} nodes ({g.n_features} features, {cfg.n_layers * 6} errors, 6 tokens, "
            f"{len(g.logit_tokens)} logits), {n_edges} edges") in r, r
    masks = g.prune_masks(0.8, 0.98)
    assert isinstance(masks, Pruned) and Graph.prune is Graph.prune_masks
    old = g.prune(0.8, 0.98)
    np.testing.assert_array_equal(old.edge_mask, masks.edge_mask)
    assert repr(masks).startswith(f"Pruned({int(masks.node_mask.sum())} of {g.adjacency.shape[0]} nodes")
    fig = g.plot(tmp_path / "g.png")
    texts = [t.get_text() for t in fig.axes[0].texts]
    for t, p in zip(g.logit_tokens, g.logit_probabilities):
        assert f"'{int(t)}' {float(p):.2f}" in texts, texts
    assert (tmp_path / "g.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------- 7. load(mesh=)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_load_checks_the_mesh_before_reading_weights(tmp_path, monkeypatch, fmt):
    from jax.sharding import Mesh

    import models.model as model_mod
    from models import loading
    from tests.models._gguf import write_gguf
    from tests.models.test_loading import save_tiny

    hf_dir = save_tiny(tmp_path / "hf")
    path = hf_dir if fmt == "hf" else write_gguf(tmp_path / "m.gguf", hf_dir)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    seen = []

    def refuse(cfg, mesh_, rules, indivisible, where):
        seen.append((cfg.n_heads, mesh_ is mesh, indivisible, where))
        raise InputError("mesh does not fit (test)")

    def no_read(*a, **k):
        raise AssertionError("weights were read before the mesh check")

    monkeypatch.setattr(model_mod, "check_model_fits", refuse)
    monkeypatch.setattr(loading, "_stream", no_read)
    with pytest.raises(InputError, match="mesh does not fit"):
        models.load(path, "float32", mesh=mesh, tokenizer=False, indivisible="error")
    assert seen == [(4, True, "error", "models.load")]
    monkeypatch.undo()
    m = models.load(path, "float32", mesh=mesh, tokenizer=False)  # a mesh that fits loads as before
    assert m.cfg.n_heads == 4


# ------------------------------------------------------------------------------------- the pure core takes TL names


def test_transformer_forward_captures_tl_names_and_run_keys(tiny):
    from models import transformer
    from models.transformer import Capture

    run = lambda cap: transformer.forward(tiny.params, CFG, jnp.asarray(TOKENS), jnp.asarray(MASK), capture=cap).acts
    want = np.asarray(run((Capture("attn.z", layers=(1,)),))["attn.z"])
    for spelling in ("blocks.1.attn.hook_z", "L1.attn.z", Capture("blocks.1.attn.hook_z")):
        np.testing.assert_array_equal(np.asarray(run((spelling,))["attn.z"]), want)
    with pytest.raises(InputError, match="already names layer 1"):
        transformer.as_capture(Capture("blocks.1.attn.hook_z", layers=(2,)))
    with pytest.raises(InputError, match="blocks.1.attn.hook_nothing"):
        transformer.as_capture("blocks.1.attn.hook_nothing")
