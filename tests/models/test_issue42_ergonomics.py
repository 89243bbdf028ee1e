"""Issue 42, what sends a TransformerLens user back: unknown sites name the valid ones everywhere, TL hook names
wherever a hook is taken (capture, `Capture`, `Hook.parse`, SAE training sites) and a TL-style cache export,
`Activations.tokens` / `.str_tokens`, the mesh warning for axes a mesh cannot split, `initialize()` on one host,
the SAE warm-up that does not fit its run, and typed DLA results. Tiny random models only."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest

import models
from interp import lens
from models.testing import random_model, tiny_config
from models.activations import Activations, run_with_cache
from models.errors import InputError
from models.sites import ALL_SITES, Hook, UnknownSiteError, check_site
from models.transformer import Capture

CFG = tiny_config("llama", vocab_size=40)
TOKENS = np.asarray(jax.random.randint(jax.random.key(1), (2, 6), 0, 40))
MASK = np.asarray([[1] * 6, [0, 0] + [1] * 4])


@pytest.fixture(scope="module")
def tiny():
    return random_model(CFG, jax.random.key(0))


# ------------------------------------------------------------------------------------------- unknown sites


def test_unknown_site_is_an_input_error_listing_the_sites_everywhere(tiny):
    every = ", ".join(ALL_SITES)
    with pytest.raises(InputError, match="unknown activation site 'attn.zz'; known sites: " + every.replace(".", r"\.")):
        check_site("attn.zz")
    with pytest.raises(KeyError):  # older callers that caught KeyError still do
        check_site("attn.zz")
    assert issubclass(UnknownSiteError, InputError)
    for capture in ("resid", Capture("resid"), ("resid_post", Capture("mlp.hidden", layers=(1,)))):
        with pytest.raises(InputError, match="known sites: embed, resid_pre"):
            models.forward(tiny, TOKENS, MASK, capture=capture)
    with pytest.raises(InputError, match="known sites"):
        Hook("resid", 1)
    # the lens reads residual sites only: another site (which used to fail with a broadcasting error) or an
    # unknown one names the three it reads
    for site in ("attn.z", "nope", "blocks.1.hook_resid_post"):
        with pytest.raises(InputError, match=r"logit_lens site=.*resid_pre, resid_mid, resid_post"):
            lens.logit_lens(tiny, TOKENS, MASK, site=site)
    np.testing.assert_array_equal(lens.logit_lens(tiny, TOKENS, MASK, site="hook_resid_mid"),
                                  lens.logit_lens(tiny, TOKENS, MASK, site="resid_mid"))
    # a TransformerLens name where a bare site is required says what it translates to
    with pytest.raises(InputError, match=r"TransformerLens hook name: that is Hook\('attn.z', 3\)"):
        check_site("blocks.3.attn.hook_z")


# ------------------------------------------------------------------------------------------- TL names


def test_tl_names_in_capture_capture_objects_and_hook_parse(tiny):
    _, ref = models.forward(tiny, TOKENS, MASK, capture=(Capture("attn.z", layers=(1,)), "embed",
                                                         Capture("resid_post", layers=(0, 2))))
    specs = [("blocks.1.attn.hook_z", "hook_embed", "blocks.2.hook_resid_post", "blocks.0.hook_resid_post"),
             (Capture("blocks.1.attn.hook_z"), "embed", "L2.resid_post", Hook("resid_post", 0)),
             ("L1.attn.z", Hook("embed"), Capture("resid_post", layers=(2, 0)))]
    for capture in specs:
        _, acts = models.forward(tiny, TOKENS, MASK, capture=capture)
        assert set(acts) == {"attn.z", "embed", "resid_post"}
        for k in acts:
            np.testing.assert_array_equal(acts[k], ref[k])
        a = Activations(acts, MASK, capture)
        assert a.layers("resid_post") == (0, 2) and a.layers("attn.z") == (1,)
        np.testing.assert_array_equal(a["blocks.2.hook_resid_post"], ref["resid_post"][1])
        np.testing.assert_array_equal(a["L0.resid_post"], ref["resid_post"][0])
    _, lists = models.forward(tiny, TOKENS, MASK, capture=(Capture("resid_post", layers=[2, 0], positions=[-1]),))
    np.testing.assert_array_equal(lists["resid_post"][:, :, 0], ref["resid_post"][:, :, -1])  # lists are hashable now
    assert Hook.parse("blocks.3.attn.hook_z") == Hook("attn.z", 3) == Hook.parse("L3.attn.z")
    assert Hook.parse("ln_final.hook_normalized") == Hook("final_norm")
    with pytest.raises(InputError, match="already names layer 1"):
        models.forward(tiny, TOKENS, MASK, capture=(Capture("blocks.1.attn.hook_z", layers=(2,)),))
    with pytest.raises(InputError, match="different positions"):
        models.forward(tiny, TOKENS, MASK, capture=(Capture("resid_post", positions=(-1,)), "blocks.1.hook_resid_post"))
    with pytest.raises(InputError, match="no activation site corresponds to the TransformerLens hook 'blocks.1.hook_x'"):
        models.forward(tiny, TOKENS, MASK, capture=("blocks.1.hook_x",))


def test_tl_cache_tokens_and_str_tokens():
    from tests.models.test_tl_user import byte_level_tokenizer

    tok = byte_level_tokenizer()
    cfg = dataclasses.replace(CFG, vocab_size=tok.vocab_size)
    m = models.Model(random_model(cfg, jax.random.key(0)).params, cfg, tok, "tiny")
    texts = ["Mary", "Mary went to Paris"]
    _, a = run_with_cache(m, texts, capture=("blocks.1.hook_resid_post", "attn.pattern", "hook_embed"))
    tokens, mask = m.tokenize(texts)
    np.testing.assert_array_equal(np.asarray(a.tokens), tokens)
    assert a.str_tokens == [m.to_str_tokens(t) for t in texts]
    assert a.str_tokens[1][-1] == " Paris" and len(a.str_tokens[0]) == int(mask[0].sum()) < tokens.shape[1]
    cache = a.tl_cache()
    want = {"blocks.1.hook_resid_post", "hook_embed"} | {f"blocks.{i}.attn.hook_pattern" for i in range(3)}
    assert set(cache) == want
    np.testing.assert_array_equal(cache["blocks.2.attn.hook_pattern"], a["attn.pattern", 2])
    np.testing.assert_array_equal(cache["blocks.1.hook_resid_post"], a.acts["resid_post"][0])
    assert cache["hook_embed"].shape == (2, tokens.shape[1], cfg.d_model)  # padded, as indexing returns
    # the pytree carries the tokens; an Activations built without them says how to get them
    doubled = jax.tree.map(lambda v: v * 2, a)
    np.testing.assert_array_equal(np.asarray(doubled.tokens), 2 * tokens)
    plain = Activations(a.acts, a.mask, ("resid_post", "attn.pattern", "embed"))
    with pytest.raises(InputError, match="no tokens"):
        plain.tokens
    with pytest.raises(InputError, match="no tokenizer"):
        plain.str_tokens


def test_sae_training_sites_take_hook_names():
    from saes.train.config import TrainConfig

    kw = dict(tokens=4096 * 100)
    cfg = TrainConfig(site=("blocks.3.hook_resid_post", "blocks.5.hook_resid_post"), **kw)
    assert cfg.site == ("resid_post",) and cfg.layers == (3, 5)
    cfg = TrainConfig(site=("L4.mlp_out", "blocks.4.hook_resid_mid", "resid_post"), **kw)
    assert cfg.site == ("mlp_out", "resid_mid", "resid_post") and cfg.layers == (4,)
    assert TrainConfig(site=("blocks.3.hook_resid_post",), layers=(3,), **kw).layers == (3,)
    with pytest.raises(InputError, match=r"name layers \[3\] but --layers is \[5\]"):
        TrainConfig(site=("blocks.3.hook_resid_post",), layers=(5,), **kw)
    with pytest.raises(InputError, match="cover the grid"):
        TrainConfig(site=("blocks.3.hook_resid_post", "blocks.5.hook_mlp_out"), **kw)
    with pytest.raises(InputError, match="no activation site corresponds"):
        TrainConfig(site=("blocks.3.hook_nothing",), **kw)
    assert TrainConfig.from_json(cfg.to_json()) == cfg


# ------------------------------------------------------------------------------------------- SAE schedule


def test_sae_warmup_longer_than_the_run_warns():
    from saes.train.config import ScheduleWarning, TrainConfig

    with pytest.warns(ScheduleWarning, match=r"--lr-warmup-steps 50 .* exceed the run's 10 steps .*whole run is "
                                             r"warm-up.* Use --lr-warmup-steps <= 8"):
        TrainConfig(tokens=4096 * 10, lr_warmup_steps=50)
    with pytest.warns(ScheduleWarning, match="stops 2 step"):
        TrainConfig(tokens=4096 * 10, lr_warmup_steps=4, lr_decay_frac=0.8)  # 4 + 8 decay steps > 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig(tokens=4096 * 10, lr_warmup_steps=8)  # 8 + 2 = 10 steps: fits
        TrainConfig(tokens=4096 * 10, lr_warmup_steps=0)
        TrainConfig()  # the defaults fit (488 steps)


# ------------------------------------------------------------------------------------------- mesh


MESH_SCRIPT = textwrap.dedent("""
    import warnings, jax
    jax.config.update("jax_num_cpu_devices", 8)
    import models
    from models import sharding
    from models.errors import InputError
    from models.testing import tiny_config
    from models.params import init_params
    cfg = tiny_config(vocab_size=128, n_layers=2, d_mlp=64, n_ctx=32, n_heads=9, n_kv_heads=3)
    params = init_params(cfg, jax.random.key(0))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mesh = sharding.sweep_mesh(model=8, cfg=cfg)
        sharded = sharding.shard_params(params, mesh)
        ok = sharding.shard_params(params, sharding.sweep_mesh(model=1))  # nothing to split: no warning
    msgs = [str(x.message) for x in w if issubclass(x.category, sharding.IndivisibleWarning)]
    assert len(msgs) == 2, msgs
    for m in msgs:
        assert "heads (9) is not divisible by mesh axis 'model' (8)" in m and "kv_heads (3)" in m, m
        assert "blocks.attn.W_Q" in m and "indivisible=" in m, m
    assert msgs[1].startswith("shard_params") and msgs[0].startswith("sweep_mesh")
    assert w[0].filename.endswith("<string>")  # points at the caller
    assert sharded["blocks"]["attn"]["W_Q"].sharding.spec[2] is None  # replicated, as warned
    assert sharded["blocks"]["mlp"]["W_in"].sharding.spec[-1] == "model"  # d_mlp 64 splits
    for call in (lambda: sharding.sweep_mesh(model=8, cfg=cfg, indivisible="error"),
                 lambda: sharding.shard_params(params, mesh, indivisible="error")):
        try:
            call()
            raise SystemExit("no error")
        except InputError as e:
            assert "heads (9)" in str(e)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sharding.shard_params(params, mesh, indivisible="ignore")
    try:
        sharding.sweep_mesh(model=3)
        raise SystemExit("no error")
    except InputError as e:
        assert "model=3" in str(e)
    print("MESH OK")
""")

INIT_SCRIPT = textwrap.dedent("""
    import os
    for k in ("INTERP_COORDINATOR", "INTERP_NUM_PROCESSES", "INTERP_PROCESS_ID"):
        os.environ.pop(k, None)
    from models import sharding
    from models.errors import InputError
    assert sharding.initialize() is False
    assert sharding.initialize(num_processes=1) is False
    try:
        sharding.initialize(num_processes=2)
        raise SystemExit("no error")
    except InputError as e:
        assert "2 processes need a coordinator" in str(e), e
    import jax
    assert jax.process_count() == 1 and float(jax.numpy.ones(3).sum()) == 3.0
    assert sharding.initialize() is False  # still a no-op once JAX has run (README: a late call on one host)
    print("INIT OK")
""")


@pytest.mark.parametrize("script,ok", [(MESH_SCRIPT, "MESH OK"), (INIT_SCRIPT, "INIT OK")], ids=["mesh", "initialize"])
def test_mesh_warning_and_single_host_initialize(script, ok):
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and ok in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------- typed DLA


def test_dla_top_names_components_that_sum_to_the_total(tiny):
    dla = lens.direct_logit_attribution(tiny, TOKENS, MASK, lens.unembed_direction(tiny, 3, 4))
    for row in (0, 1):
        comps = dla.components(row)
        assert len(comps) == 1 + CFG.n_layers * (CFG.n_heads + 2) + 1  # embed, heads + b_O + MLP per layer, biases
        np.testing.assert_allclose(sum(comps.values()), float(dla.total()[row]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(comps["L2H1"], float(dla.heads[2, row, 1]))
        np.testing.assert_allclose(comps["L0 MLP"], float(dla.mlp[0, row]))
    top = dla.top(3, row=1, label='"a" - "b"')
    values = np.abs(list(dla.components(1).values()))
    np.testing.assert_allclose(sorted(np.abs(top.values), reverse=True), np.sort(values)[::-1][:3], rtol=1e-6)
    assert top.names[0] in dla.components(1) and len(top.rows()) == 3
    text = repr(top)
    assert text.startswith('direct logit attribution to "a" - "b" (top 3)') and top.names[0] in text
    assert top.table().splitlines()[0].startswith("| component | contribution to")
    assert repr(dla).startswith("DLA(layers=3, rows=2, heads [3, 2, 4]; total per row [") and len(repr(dla)) < 200
    with pytest.raises(InputError, match="row must be in"):
        dla.top(3, row=2)
    with pytest.raises(InputError, match="k must be an int >= 1"):
        dla.top(0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_is_minus_one_in_every_api(tiny, side):
    """`positions=(-1,)` (Capture), `Absolute(-1)` and `FromEnd(-1)` pick the same token on padded batches."""
    from interp import positions as P
    from models.checks import real_index

    mask = np.asarray([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    mask = mask if side == "left" else mask[:, ::-1].copy()
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (3, 6), 0, 40))
    last = np.asarray([np.flatnonzero(r)[-1] for r in mask])  # the truth, from the mask alone
    new = np.asarray(P.FromEnd(-1, -2)(tokens, mask))
    np.testing.assert_array_equal(new, np.stack([last, last - 1], 1))
    np.testing.assert_array_equal(new, P.Absolute(-1, -2)(tokens, mask))
    np.testing.assert_array_equal(new, real_index(mask, (-1, -2)))
    _, full = models.forward(tiny, tokens, mask, capture=("resid_post",))
    _, sel = models.forward(tiny, tokens, mask, capture=(Capture("resid_post", positions=(-1, -2)),))
    np.testing.assert_allclose(np.asarray(sel["resid_post"]),
                               np.asarray(P.gather(full["resid_post"], new, seq_axis=2)), atol=1e-6)


def test_from_end_rejects_the_old_count():
    from interp import positions as P

    with pytest.raises(InputError, match=r"FromEnd offsets must be <= -1.*FromEnd\(-1\) is the last token"
                                         r".*got \(0, 1\).*now FromEnd\(-1, -2\)"):
        P.FromEnd(0, 1)
    with pytest.raises(InputError, match=r"must be <= -1.*got \(-1, 0\)$"):
        P.FromEnd(-1, 0)
    with pytest.raises(InputError, match="must be ints <= -1"):
        P.FromEnd(-0.5)
    with pytest.raises(InputError, match="at least one offset"):
        P.FromEnd()


def test_sae_training_prints_one_summary_line_and_a_smoothed_speed():
    from saes.train.loop import Smoothed, summary_line
    from saes.train.config import TrainConfig

    line = summary_line(TrainConfig(site=("blocks.3.hook_resid_post", "blocks.5.hook_resid_post"), out="/tmp/r"))
    assert "\n" not in line and line.startswith("training topk SAEs (L3.resid_post, L5.resid_post), width 8192, k 32")
    assert "488 steps x 4096 tokens" in line and line.endswith("full config: /tmp/r/config.json")
    s = Smoothed(weight=0.5)
    # the first window (compilation) is replaced by the second, then an exponential average
    assert [s.update(x) for x in (10.0, 100.0, 200.0, 200.0)] == [10.0, 100.0, 150.0, 175.0]


def test_head_grid_labels_tops_and_plots(tmp_path):
    from interp.heads import HeadGrid

    v = np.asarray([[0.1, -0.9, 0.0], [0.5, 0.2, np.nan]])
    g = HeadGrid(v, "zero ablation", first_layer=4)
    assert g.shape == (2, 3) and g[1, 0] == 0.5 and np.array_equal(np.asarray(g), v, equal_nan=True)
    assert g.top(2) == [("L4H1", -0.9), ("L5H0", 0.5)]
    assert repr(g) == "HeadGrid('zero ablation', 2 layers x 3 heads; largest |value|: L4H1 -0.9, L5H0 +0.5, L5H1 +0.2)"
    assert g.table(1).splitlines() == ["| head | zero ablation |", "|---|---:|", "| L4H1 | -0.9 |"]
    fig = g.plot(path=str(tmp_path / "g.png"))
    assert (tmp_path / "g.png").stat().st_size > 0
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["4", "5"]
    with pytest.raises(InputError, match=r"\[layers, heads\]"):
        HeadGrid(np.zeros(3))


def test_readout_with_refuses_its_own_sites_in_any_spelling(tiny):
    from interp.readout import readout_with

    for name in ("resid_post", "blocks.2.hook_resid_post", "ln_final.hook_normalized"):
        with pytest.raises(InputError, match="readout_with captures resid_post/final_norm itself"):
            readout_with(tiny, TOKENS, MASK, capture=(name,))
    r, acts = readout_with(tiny, TOKENS, MASK, capture=("blocks.1.hook_mlp_out",))
    _, ref = models.forward(tiny, TOKENS, MASK, capture=(Capture("mlp_out", layers=(1,)),))
    np.testing.assert_allclose(acts["mlp_out"], ref["mlp_out"], rtol=1e-6, atol=1e-6)
