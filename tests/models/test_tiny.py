"""Every architecture against transformers on tiny random models built offline, loaded from saved HF dirs."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import torch
import transformers

import models
from models.testing import tiny_config
from models import transformer
from models.loading import load_hf_dir

V = 101
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=48, n_layer=3, n_head=4, n_positions=64),
    "llama-gqa": lambda: transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                                                  tie_word_embeddings=True),
    "llama3-rope-scaling-mqa": lambda: transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                                                num_attention_heads=8, num_key_value_heads=1, intermediate_size=80,
                                                                max_position_embeddings=64, rope_scaling=LLAMA3_ROPE),
    "mistral-sliding": lambda: transformers.MistralConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                          num_key_value_heads=4, intermediate_size=96, max_position_embeddings=64,
                                                          sliding_window=5),
    "qwen2-bias": lambda: transformers.Qwen2Config(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64),
    "gemma2": lambda: transformers.Gemma2Config(vocab_size=V, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                                num_key_value_heads=2, head_dim=16, intermediate_size=96, max_position_embeddings=64,
                                                sliding_window=5, query_pre_attn_scalar=12, attn_logit_softcapping=5.0,
                                                final_logit_softcapping=3.0),
    "gemma3": lambda: transformers.Gemma3TextConfig(vocab_size=V, hidden_size=64, num_hidden_layers=7, num_attention_heads=4,
                                                    num_key_value_heads=1, head_dim=16, intermediate_size=96,
                                                    max_position_embeddings=64, sliding_window=5, query_pre_attn_scalar=16),
}


def random_hf_model(hf_cfg, path):
    """A seeded random transformers model of `hf_cfg` (eager attention) with non-trivial norm weights and biases
    (every 1-D parameter moved by normal(0, 0.2)), saved to `path`."""
    torch.manual_seed(0)
    hf_cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    """(transformers model, our config, our params) for one architecture, with non-trivial norms and biases."""
    path = tmp_path_factory.mktemp(request.param)
    model = random_hf_model(CONFIGS[request.param](), path)
    cfg, params = load_hf_dir(path)
    return request.param, model, cfg, params


def _reference(model, tokens, mask):
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                    output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def _rel(a, b, valid):
    return np.abs(np.asarray(a) - b)[valid].max() / np.abs(b[valid]).max()


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
def test_logits_and_every_residual_match_transformers(tiny, unroll):
    name, model, cfg, params = tiny
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, V, (3, 13))
    mask = np.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    mask[2, :9] = 0
    ref_logits, hidden = _reference(model, tokens, mask)
    logits, acts = transformer.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask),
                                       capture=("resid_pre", "resid_post"), unroll=unroll)
    valid = mask.astype(bool)
    assert _rel(logits, ref_logits, valid) < 1e-5, name
    for layer in range(cfg.n_layers):
        assert _rel(acts["resid_pre"][layer], hidden[layer], valid) < 1e-5, (name, layer)
    # transformers' last hidden state is after the final norm; every earlier one is a resid_post
    for layer in range(cfg.n_layers - 1):
        assert _rel(acts["resid_post"][layer], hidden[layer + 1], valid) < 1e-5, (name, layer)


def test_scan_and_unrolled_agree(tiny):
    _, _, cfg, params = tiny
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, V, (2, 9)))
    a = transformer.forward(params, cfg, tokens, capture=("attn.pattern", "mlp.post"))
    b = transformer.forward(params, cfg, tokens, capture=("attn.pattern", "mlp.post"), unroll=True)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5, rtol=1e-5)
    for k in a[1]:
        np.testing.assert_allclose(a[1][k], b[1][k], atol=1e-5, rtol=1e-5)


def test_layer_forward_is_the_scan_step(tiny):
    """`layer_forward` at a traced layer index (as inside a `fori_loop`) reproduces each layer of the scan,
    sliding-window and global layers alike, on a left-padded batch."""
    _, _, cfg, params = tiny
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, V, (2, 9)))
    mask = jnp.asarray(np.r_[np.ones((1, 9)), np.c_[np.zeros((1, 3)), np.ones((1, 6))]], jnp.int32)
    acts = transformer.forward(params, cfg, tokens, mask, capture=("resid_pre", "resid_post", "mlp.post"))[1]
    pos = transformer.default_positions(mask)
    step = jax.jit(lambda l, r: transformer.layer_forward(params, cfg, l, r, mask, pos, ("mlp.post",)))
    for layer in range(cfg.n_layers):
        out, caps = step(jnp.int32(layer), acts["resid_pre"][layer])
        np.testing.assert_allclose(out, acts["resid_post"][layer], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(caps["mlp.post"], acts["mlp.post"][layer], atol=1e-5, rtol=1e-5)
    for bad in (cfg.n_layers, np.int64(-1), jnp.int32(cfg.n_layers)):
        with pytest.raises(models.InputError, match=rf"layer {int(bad)} is outside \[0, {cfg.n_layers}\)"):
            transformer.layer_forward(params, cfg, bad, acts["resid_pre"][0], mask, pos)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_one_parameter_table_gives_shapes_init_and_sharding_axes(arch):
    """`models.params.PARAMS` is the one table: each parameter's shape is its axes' sizes, `init_params` makes
    exactly those arrays, and sharding reads the same axes back (`logical_axes`)."""
    from models.params import axis_sizes, logical_axes, param_axes

    cfg = tiny_config(arch, qkv_bias=True, mlp_bias=arch == "gpt2")
    params = models.init_params(cfg, jax.random.key(0))
    axes = param_axes(cfg)
    assert logical_axes(params) == axes
    sizes = axis_sizes(cfg)
    flat = jax.tree_util.tree_leaves_with_path(params)
    assert flat and all(a.shape == tuple(sizes[n] for n in ax) for (_, a), ax in
                        zip(flat, jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))))
    with pytest.raises(KeyError, match="not in models.params.PARAMS"):
        logical_axes({"blocks": {"attn": {"W_X": params["blocks"]["attn"]["W_Q"]}}})
