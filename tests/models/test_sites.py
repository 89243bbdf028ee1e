"""Activation sites: identities between them on the real SmolLM2, shapes from the registry, selective capture."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import transformer
from models.sites import ALL_SITES, SITES
from models.testing import tiny_config


def assert_close(a, b, rel=1e-5):
    """Equal up to float32 rounding of a differently fused program: max error <= rel * max |b|."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rel * np.abs(b).max(), np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def smol_batch(smollm2):
    texts = [smollm2.apply_chat_template([{"role": "user", "content": t}]) for t in ("Name three colours.", "Hi")]
    tokens, mask = smollm2.tokenize(texts)
    logits, acts = models.forward(smollm2, tokens, attention_mask=mask, capture=ALL_SITES)
    return tokens, mask, logits, acts


def test_head_outputs_sum_to_attn_out_and_resid_identities(smollm2, smol_batch):
    _, mask, _, acts = smol_batch
    v = mask.astype(bool)
    scale = float(jnp.abs(acts["attn_out"]).max())
    np.testing.assert_allclose(acts["attn.head_out"].sum(3)[:, v], acts["attn_out"][:, v], atol=2e-5 * scale)
    np.testing.assert_allclose((acts["resid_pre"] + acts["attn_out"])[:, v], acts["resid_mid"][:, v], atol=1e-5 * scale)
    np.testing.assert_allclose((acts["resid_mid"] + acts["mlp_out"])[:, v], acts["resid_post"][:, v],
                               atol=1e-5 * float(jnp.abs(acts["resid_post"]).max()))
    np.testing.assert_array_equal(acts["resid_post"][:-1], acts["resid_pre"][1:])
    np.testing.assert_array_equal(acts["embed"], acts["resid_pre"][0])


def test_pattern_is_causal_normalised_and_zero_on_padding(smol_batch):
    _, mask, _, acts = smol_batch
    p = np.asarray(acts["attn.pattern"])  # [L, B, H, T, S]
    T = p.shape[-1]
    assert np.all(np.triu(np.ones((T, T), bool), 1)[None, None, None] <= (p == 0))
    valid_q = mask.astype(bool)[None, :, None, :]
    np.testing.assert_allclose(p.sum(-1)[np.broadcast_to(valid_q, p.shape[:-1])], 1.0, atol=1e-5)
    assert np.all(p.sum(-1)[np.broadcast_to(~valid_q, p.shape[:-1])] == 0)
    pad_keys = ~mask.astype(bool)[None, :, None, None, :]
    assert np.all(p[np.broadcast_to(pad_keys, p.shape)] == 0)


def test_every_site_has_its_registered_shape(smollm2, smol_batch):
    tokens, _, _, acts = smol_batch
    c = smollm2.cfg
    sizes = {"batch": tokens.shape[0], "seq": tokens.shape[1], "kv_seq": tokens.shape[1], "embed": c.d_model,
             "heads": c.n_heads, "kv_heads": c.n_kv_heads, "head_dim": c.d_head, "mlp": c.d_mlp}
    assert set(acts) == set(ALL_SITES)
    for name in ALL_SITES:  # a dense model's sites (the mixture-of-experts ones: tests/models/test_families.py)
        site = SITES[name]
        want = ((c.n_layers,) if site.per_layer else ()) + tuple(sizes[a] for a in site.axes)
        assert acts[name].shape == want, name


def test_capture_is_selective(smollm2, smol_batch):
    tokens, mask, logits, acts = smol_batch
    l2, a2 = models.forward(smollm2, tokens, attention_mask=mask)
    assert a2 == {}
    assert_close(l2, logits)
    _, a3 = models.forward(smollm2, tokens, attention_mask=mask,
                           capture=(models.Capture("resid_post", layers=(3, 17), positions=(-1,)),
                                    models.Capture("attn.pattern", layers=(5,), seq_indices=(0, 2))))
    assert_close(a3["resid_post"], acts["resid_post"][jnp.array([3, 17])][:, :, -1:])
    assert_close(a3["attn.pattern"], acts["attn.pattern"][5:6][:, :, :, jnp.array([0, 2])])


def test_stop_at_layer_and_resume_from_resid(smollm2, smol_batch):
    tokens, mask, logits, acts = smol_batch
    none, early = models.forward(smollm2, tokens, attention_mask=mask, capture=("resid_post",), stop_at_layer=7)
    assert none is None and early["resid_post"].shape[0] == 7
    assert_close(early["resid_post"], acts["resid_post"][:7])
    resumed, late = models.forward(smollm2, tokens, attention_mask=mask, capture=("resid_post",), start_layer=7,
                                   resid=acts["resid_pre"][7])
    assert_close(resumed, logits)
    assert_close(late["resid_post"], acts["resid_post"][7:])


def test_unused_sites_are_not_computed():
    """Only requested sites survive compilation: per-head outputs are absent from a plain forward's HLO."""
    cfg = tiny_config(vocab_size=50, n_layers=2, n_ctx=32)
    params = models.init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.zeros((1, 6), jnp.int32)
    plain = jax.jit(lambda p: transformer.forward(p, cfg, tokens)).lower(params).compile().as_text()
    heads = jax.jit(lambda p: transformer.forward(p, cfg, tokens, capture=("attn.head_out",))).lower(params).compile().as_text()
    assert "f32[2,1,6,4,32]" not in plain and "f32[2,1,6,4,32]" in heads  # [L, B, T, H, D]


@pytest.mark.parametrize("unroll", [False, True])
def test_capture_at_chosen_layers_keeps_only_those_inside_the_scan(unroll):
    """Layers chosen in any order (repeats allowed) give the full capture's values at those layers, also when
    resuming at a later layer; the program never holds the stack of every layer's pattern, only a buffer of
    the distinct chosen layers plus one scratch slot."""
    cfg = tiny_config(vocab_size=50, n_layers=6, n_ctx=32)
    params = models.init_params(cfg, jax.random.PRNGKey(3), scale=0.3)
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 5), 0, 50)
    _, full = transformer.forward(params, cfg, tokens, capture=("attn.pattern", "resid_pre", "attn.head_out"))
    cap = (models.Capture("attn.pattern", layers=(4, 1, 4)), models.Capture("resid_pre", layers=(5, 2)),
           models.Capture("attn.head_out", layers=(3, 0), positions=(-1,)))
    _, some = transformer.forward(params, cfg, tokens, capture=cap, unroll=unroll)
    assert_close(some["attn.pattern"], full["attn.pattern"][jnp.array([4, 1, 4])])
    assert_close(some["resid_pre"], full["resid_pre"][jnp.array([5, 2])])
    assert_close(some["attn.head_out"], full["attn.head_out"][jnp.array([3, 0])][:, :, -1:])
    _, late = transformer.forward(params, cfg, tokens, capture=cap[1:2], start_layer=2, resid=full["resid_pre"][2],
                                  unroll=unroll)
    assert_close(late["resid_pre"], full["resid_pre"][jnp.array([5, 2])])

    hlo = jax.jit(lambda p: transformer.forward(p, cfg, tokens, capture=(models.Capture("attn.pattern", layers=(4,)),),
                                                unroll=unroll)).lower(params).compile().as_text()
    assert "f32[6,2,4,5,5]" not in hlo  # [L, B, H, T, S]: every layer's pattern
    assert unroll or "f32[2,2,4,5,5]" in hlo  # the scan's buffer: layer 4 and the scratch slot


class _Identity:
    site = "attn.head_out"

    def apply(self, value, ctx):
        return value


def test_head_out_derived_after_the_scan_equals_the_in_layer_value():
    """A captured-only attn.head_out is rebuilt from attn.z after the scan; with an intervention on it, it is
    computed inside the layer. Both give the same values (layers and positions selected alike)."""
    cfg = tiny_config(vocab_size=50, n_ctx=32)
    params = models.init_params(cfg, jax.random.PRNGKey(1), scale=0.3)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 7), 0, 50)
    cap = (models.Capture("attn.head_out", layers=(0, 2), positions=(1, -1)),)
    derived = transformer.forward(params, cfg, tokens, capture=cap)[1]["attn.head_out"]
    in_layer = transformer.forward(params, cfg, tokens, capture=cap, interventions=(_Identity(),))[1]["attn.head_out"]
    assert derived.shape == (2, 2, 2, 4, 32)
    assert_close(derived, in_layer)


def test_one_hook_type_names_a_stream_for_capture_interventions_and_activations():
    """`models.Hook(site, layer)`: its key and TransformerLens name round-trip; as a capture it is that layer's
    `Capture`, as an intervention site it selects that layer (`interp.interventions.at`), and `Activations`
    indexes by it. Invalid identities are InputErrors naming the cause."""
    from interp.interventions import AddVector, Where, at

    h = models.Hook("resid_pre", 2)
    assert (h.key, h.tl) == ("L2.resid_pre", "blocks.2.hook_resid_pre") and tuple(h) == ("resid_pre", 2)
    assert models.Hook.parse(h.key) == h == models.Hook.from_tl(h.tl) and models.Hook("embed").key == "embed"
    for bad, msg in [(("resid_pre", -1), "layer must be an integer >= 0"), (("embed", 0), "not per layer"),
                     (("resid", 1), "unknown activation site 'resid'")]:
        with pytest.raises(models.InputError, match=msg):
            models.Hook(*bad)
    with pytest.raises(models.InputError, match="invalid hook name 'L2.embed'"):
        models.Hook.parse("L2.embed")

    cfg = tiny_config(vocab_size=50, n_layers=4, n_ctx=32)
    params = models.init_params(cfg, jax.random.PRNGKey(5), scale=0.3)
    tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 5), 0, 50)
    _, by_hook = transformer.forward(params, cfg, tokens, capture=(h,))
    _, by_capture = transformer.forward(params, cfg, tokens, capture=(models.Capture("resid_pre", layers=(2,)),))
    np.testing.assert_array_equal(by_hook["resid_pre"], by_capture["resid_pre"])
    assert models.Activations(by_hook, None, (h,))[h].shape == (2, 5, cfg.d_model)

    v = jax.random.normal(jax.random.PRNGKey(7), (cfg.d_model,))
    assert at(h) == Where(layers=(2,)) == at("resid_pre", 2) and at("embed") == Where()
    by_hook = transformer.forward(params, cfg, tokens, interventions=(AddVector(h, v, 3.0),)).logits
    by_where = transformer.forward(params, cfg, tokens, interventions=(AddVector("resid_pre", v, 3.0, layers=(2,)),)).logits
    np.testing.assert_array_equal(by_hook, by_where)
    with pytest.raises(models.InputError, match="the Hook names the layer"):
        AddVector(h, v, layers=(1,))
