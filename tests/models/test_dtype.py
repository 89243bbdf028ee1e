"""The dtype policy: bfloat16 weights/activations run with float32 norms, softmax and logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import models
from models.testing import tiny_config
from models import transformer


def test_bfloat16_forward_tracks_float32(smollm2):
    bf16 = models.Model(jax.tree.map(lambda a: a.astype(jnp.bfloat16), smollm2.params),
                        smollm2.cfg.replace(dtype="bfloat16"), smollm2.tokenizer)
    text = smollm2.apply_chat_template([{"role": "user", "content": "Give me three tips for better sleep."}])
    tokens, mask = smollm2.tokenize([text])
    ref, _ = models.forward(smollm2, tokens, attention_mask=mask)
    out, acts = models.forward(bf16, tokens, attention_mask=mask, capture=("resid_post", "attn.pattern"))
    assert out.dtype == jnp.float32 and acts["attn.pattern"].dtype == jnp.float32
    assert acts["resid_post"].dtype == jnp.bfloat16
    agree = float((jnp.argmax(out[0], -1) == jnp.argmax(ref[0], -1)).mean())
    assert agree > 0.9, agree
    p, q = jax.nn.softmax(ref[0], -1), jax.nn.log_softmax(out[0], -1)
    kl = float(jnp.sum(p * (jnp.log(p + 1e-30) - q), -1).mean())
    assert kl < 0.05, kl


def test_norm_runs_in_float32():
    cfg = tiny_config("llama", vocab_size=8, d_model=4, n_layers=1, n_heads=1, n_kv_heads=1, d_head=4, d_mlp=4, n_ctx=4)
    x = jnp.asarray([[[3e4, -3e4, 1.0, 2.0]]], jnp.bfloat16)  # squares overflow bfloat16's precision, not float32's
    y = transformer.norm(x, {"w": jnp.ones(4, jnp.bfloat16)}, cfg)
    expect = np.asarray(x, np.float32) / np.sqrt(np.mean(np.asarray(x, np.float32) ** 2) + cfg.norm_eps)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), expect, rtol=1e-2)
