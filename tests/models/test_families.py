"""Qwen3, GPT-NeoX (Pythia), OLMo 2 and Phi-3 against `transformers`, on tiny random configurations built offline.

Each family is a setting of `models.Config` (`qk_norm`, `qk_norm_full`, `pre_norms`, `parallel_block`,
`rotary_dim`), so these check the switches: logits and every layer's `resid_pre` / `resid_post` on a left-padded
batch (float32, 1e-5 of the reference's largest value, scanned and unrolled), greedy generation with the KV cache
against `transformers`' own `generate`, and capture of every registry site. Then the library on random models of
each family: attribution graphs (transcoders plus error nodes reproduce the logits), the vmapped head-ablation
sweep against one forward per head, steering during generation.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import interp
import models
import saes
from interp import probes
from interp import interventions as I
from models.testing import random_model, tiny_config
from models import transformer
from models.generate import generate_tokens
from tests.models.test_tiny import random_hf_model
from tests.models._gguf import write_gguf
from saes.circuits.attribution import attribute
from saes.core.transcoders import random_set

V = 96
CONFIGS = {
    "qwen3": lambda: transformers.Qwen3Config(vocab_size=V, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                              num_key_value_heads=2, head_dim=12, intermediate_size=80,
                                              max_position_embeddings=64, rms_norm_eps=1e-6),
    "qwen3-tied": lambda: transformers.Qwen3Config(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, num_key_value_heads=1, head_dim=24,
                                                   intermediate_size=40, max_position_embeddings=64,
                                                   tie_word_embeddings=True),
    "pythia": lambda: transformers.GPTNeoXConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                 intermediate_size=96, rotary_pct=0.25, max_position_embeddings=64,
                                                 eos_token_id=0, bos_token_id=0),
    "neox-sequential-full-rotary": lambda: transformers.GPTNeoXConfig(
        vocab_size=V, hidden_size=40, num_hidden_layers=2, num_attention_heads=5, intermediate_size=64, rotary_pct=1.0,
        use_parallel_residual=False, max_position_embeddings=64, eos_token_id=0, bos_token_id=0),
    "phi3": lambda: transformers.Phi3Config(vocab_size=V, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                            num_key_value_heads=2, intermediate_size=80, max_position_embeddings=64,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "phi3-partial-rotary": lambda: transformers.Phi3Config(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, max_position_embeddings=64, partial_rotary_factor=0.75, pad_token_id=0, bos_token_id=1,
        eos_token_id=2),
    "olmo2": lambda: transformers.Olmo2Config(vocab_size=V, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                              num_key_value_heads=3, intermediate_size=80, max_position_embeddings=64),
}
ARCH = {"qwen3": "qwen3", "qwen3-tied": "qwen3", "pythia": "gpt_neox", "neox-sequential-full-rotary": "gpt_neox",
        "olmo2": "olmo2", "phi3": "phi3", "phi3-partial-rotary": "phi3"}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    """(name, transformers model, our Model) with non-trivial norm weights and biases."""
    path = tmp_path_factory.mktemp(request.param)
    hf = random_hf_model(CONFIGS[request.param](), path)
    return request.param, hf, models.load(str(path), tokenizer=False)


def _rel(a, b, valid):
    return np.abs(np.asarray(a) - b)[valid].max() / np.abs(b[valid]).max()


def test_config_switches(tiny):
    name, hf, m = tiny
    cfg = m.cfg
    assert cfg.arch == ARCH[name]
    if name == "pythia":
        assert cfg.parallel_block and cfg.rotary_dim == 4 and cfg.norm == "layer" and not cfg.tie_embeddings
    if name == "olmo2":
        assert cfg.qk_norm_full and not cfg.pre_norms and cfg.post_norms
        assert m.params["blocks"]["attn"]["q_norm_full"]["w"].shape == (3, 6, 8)
    if name == "phi3-partial-rotary":
        assert cfg.rotary_dim == 12 and cfg.gated_mlp
    if name.startswith("qwen3"):
        assert cfg.qk_norm and not cfg.qk_norm_full and not cfg.qkv_bias and cfg.tie_embeddings == (name == "qwen3-tied")


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
def test_logits_and_every_residual_match_transformers(tiny, unroll):
    name, hf, m = tiny
    rng = np.random.RandomState(1)
    tokens = rng.randint(1, V, (3, 13))
    mask = np.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    mask[2, :9] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                 output_hidden_states=True)
    ref, hidden = out.logits.numpy(), [h.numpy() for h in out.hidden_states]
    logits, acts = transformer.forward(m.params, m.cfg, tokens, mask, capture=("resid_pre", "resid_post"), unroll=unroll)
    valid = mask.astype(bool)
    assert _rel(logits, ref, valid) < 1e-5, name
    for layer in range(m.cfg.n_layers):
        assert _rel(acts["resid_pre"][layer], hidden[layer], valid) < 1e-5, (name, layer)
    for layer in range(m.cfg.n_layers - 1):  # the last hidden state is after the final norm
        assert _rel(acts["resid_post"][layer], hidden[layer + 1], valid) < 1e-5, (name, layer)


def test_rows_alone_equal_the_padded_batch(tiny):
    _, _, m = tiny
    rng = np.random.RandomState(4)
    a, b = rng.randint(1, V, (1, 11)), rng.randint(1, V, (1, 6))
    tokens = np.concatenate([a, np.concatenate([np.zeros((1, 5), int), b], 1)])
    mask = np.concatenate([np.ones((1, 11), int), np.r_[[0] * 5 + [1] * 6][None]])
    batch = np.asarray(transformer.forward(m.params, m.cfg, tokens, mask)[0])
    alone = np.asarray(transformer.forward(m.params, m.cfg, b)[0])
    np.testing.assert_allclose(batch[1, 5:], alone[0], atol=1e-5 * np.abs(alone).max())


def test_greedy_generation_with_the_kv_cache_matches_transformers(tiny):
    name, hf, m = tiny
    prompt = np.random.RandomState(2).randint(1, V, (1, 7))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), attention_mask=torch.ones(1, 7, dtype=torch.long), max_new_tokens=6,
                          do_sample=False, pad_token_id=0, eos_token_id=None)[0, 7:].tolist()
    ours = generate_tokens(m, prompt, np.ones_like(prompt), jax.random.key(0), max_new_tokens=6)  # no stop ids
    assert np.asarray(ours)[0].tolist() == ref, name


def test_every_site_is_captured(tiny):
    """Every registry site exists for the new switches (no pre-norm: `ln1.normalized` is the residual itself)."""
    name, _, m = tiny
    tokens = np.random.RandomState(3).randint(1, V, (2, 5))
    _, acts = transformer.forward(m.params, m.cfg, tokens, capture=models.ALL_SITES)
    assert set(acts) == set(models.ALL_SITES)
    assert all(np.isfinite(np.asarray(v)).all() for v in acts.values())
    if not m.cfg.pre_norms:
        np.testing.assert_array_equal(acts["ln1.normalized"], acts["resid_pre"])
    if m.cfg.parallel_block:  # resid_post = resid_pre + attn_out + mlp_out
        np.testing.assert_allclose(acts["resid_post"], acts["resid_pre"] + acts["attn_out"] + acts["mlp_out"],
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the rest of the library on them

TINY = {  # our own configs of each new family (random weights; no transformers needed)
    "qwen3": dict(arch="qwen3", qk_norm=True, tie_embeddings=False),
    "gpt_neox": dict(arch="gpt_neox", norm="layer", act="gelu", gated_mlp=False, qkv_bias=True, o_bias=True,
                     mlp_bias=True, parallel_block=True, rotary_dim=4, tie_embeddings=False),
    "olmo2": dict(arch="olmo2", pre_norms=False, post_norms=True, qk_norm=True, qk_norm_full=True, tie_embeddings=False),
    "qwen3_moe": dict(arch="qwen3_moe", qk_norm=True, n_experts=4, n_experts_used=2, tie_embeddings=False),
}


def _tiny(arch):
    cfg = tiny_config(**TINY[arch])  # the llama preset's sizes, the family's switches
    return random_model(cfg, jax.random.key(0))


@pytest.mark.parametrize("arch", sorted(TINY))
def test_attribution_replacement_model_reproduces_the_logits(arch):
    """Transcoders on every MLP plus the graph's error nodes reproduce the logits; a graph builds."""
    m = _tiny(arch)
    tokens = np.array([1, 5, 9, 3, 7, 2, 11, 4, 13, 8])
    tcs = random_set(m.cfg, "relu", 40, seed=10, bias=0.05, act_scale=1.3)
    g = attribute(m, tcs, tokens)
    first = jnp.arange(len(tokens))[None] == 0
    clean = models.forward(m, tokens[None]).logits
    replaced = models.forward(m, tokens[None], interventions=(tcs.replace_mlps(error=jnp.asarray(g.errors)[:, None],
                                                                               keep=first),)).logits
    np.testing.assert_allclose(replaced, clean, atol=2e-5, rtol=0)
    assert g.n_features > 0 and np.isfinite(g.adjacency).all()


@pytest.mark.parametrize("arch", sorted(TINY))
def test_head_sweep_and_steering(arch):
    """A vmapped head-ablation sweep equals one forward per head, and steering applies during generation."""
    m = _tiny(arch)
    tokens, mask = np.array([[3, 9, 4, 7, 1, 12]]), np.ones((1, 6), int)
    metric = interp.LogitDiff(5, 6)
    effects = np.asarray(interp.head_ablation(m, tokens, mask, metric, progress=False))
    base = models.forward(m, tokens, mask).logits[0, -1]
    for layer, head in [(0, 1), (2, 3)]:
        out = models.forward(m, tokens, mask, interventions=(I.zero_heads(m.cfg, [(layer, head)]),)).logits[0, -1]
        np.testing.assert_allclose(effects[layer, head], (out[5] - out[6]) - (base[5] - base[6]), atol=1e-4)
    steer = I.AddVector("resid_pre", np.ones(32, np.float32), scale=3.0, layers=(1,))
    plain = generate_tokens(m, tokens, mask, jax.random.key(0), max_new_tokens=4)
    steered = generate_tokens(m, tokens, mask, jax.random.key(0), (steer,), max_new_tokens=4)
    assert plain.shape == steered.shape == (1, 4)


class _Rows:
    """Random token rows for a tokenizer-less model (what `saes.train.data.TokenRows` yields)."""

    def rows(self, start=0):
        rng = np.random.default_rng(start)
        while True:
            yield rng.integers(2, 64, 16).astype(np.int32)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_probes_and_transcoder_training(arch, tmp_path):
    """The per-layer probe grid and transcoder training run on every family: the grid's best cell (chosen on
    validation) reads which of two tokens ends a prompt (held-out AUROC >= 0.8 on ~19 test rows; chance 0.5), and transcoders ln2.normalized -> mlp_out trained on every
    layer at once learn to predict the MLP output (explained variance up by 0.1 in 40 steps)."""
    m = _tiny(arch)
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 60, (96, 6))
    tokens[:, -1] = np.where(np.arange(96) % 2, 61, 62)  # the label is the last token
    acts = models.forward(m, tokens, capture=("resid_post",)).acts["resid_post"][:, :, -1]  # [L, N, D]
    grid = probes.train(np.asarray(acts)[:, :, None], (np.arange(96) % 2).astype(float), seed=0)
    auroc = grid.metrics["test"]["auroc"]
    assert auroc.shape == (m.cfg.n_layers, 1) and np.all((auroc >= 0) & (auroc <= 1))
    assert grid.best_metrics()["auroc"] >= 0.8, auroc  # the best cell (chosen on validation) reads it (chance 0.5)
    layers = tuple(range(m.cfg.n_layers))
    tc = saes.TrainConfig(site=("ln2.normalized",), target="mlp_out", layers=layers, arch="relu", width=64,
                          tokens=256 * 40, batch_size=256, chunk_tokens=2048, lr=3e-3, lr_warmup_steps=5,
                          sparsity_coeff=0.5, progress=False, log_every=10, eval_every=0, checkpoint_every=1000,
                          out=str(tmp_path / "run"))
    hooks = saes.train.data.parse_hooks(tc.site, layers) + [models.Hook("mlp_out", l) for l in layers]
    run = saes.fit(tc, source=saes.ModelSource(m, hooks, _Rows(), chunk_tokens=2048, model_batch=16))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for l in layers:
        first, last = rows[0][f"L{l}.ln2.normalized"], rows[-1][f"L{l}.ln2.normalized"]
        assert last["explained_variance"] > first["explained_variance"] + 0.1, (l, first, last)
    assert sorted(run.saes) == [f"L{l}.ln2.normalized" for l in layers]


def _longrope_phi3(path):
    """A tiny Phi-3 with longrope scaling (original context 8 of 64; distinct short and long factors per
    frequency) as transformers builds it, and ours loaded from its directory."""
    rng = np.random.RandomState(3)
    cfg = transformers.Phi3Config(
        vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        intermediate_size=80, max_position_embeddings=64, original_max_position_embeddings=8, pad_token_id=0,
        rope_scaling={"type": "longrope", "short_factor": (1 + rng.rand(4)).tolist(),
                      "long_factor": (2 + 4 * rng.rand(4)).tolist()})
    hf = random_hf_model(cfg, path)
    return hf, models.load(str(path), tokenizer=False)


def test_phi3_longrope_matches_transformers(tmp_path):
    """Phi-3's long-context scaling: per-frequency short factors while a call's largest position is within the
    original context, long factors beyond it, cos and sin scaled by the attention factor sqrt(1 + ln(s) / ln(L0)),
    chosen per forward call as transformers does. Logits equal transformers' below and beyond the original context
    (1e-5), and greedy KV-cache generation that crosses it gives the same tokens as transformers' generate."""
    hf, m = _longrope_phi3(tmp_path / "phi3-longrope")
    s = m.cfg.rope_scaling
    assert s.kind == "longrope" and s.original_max_position_embeddings == 8
    assert s.attention_factor == pytest.approx(np.sqrt(1 + np.log(8.0) / np.log(8)))
    rng = np.random.RandomState(0)
    for T in (6, 20):  # within and beyond the original context of 8
        tokens = rng.randint(1, V, (2, T))
        with torch.no_grad():
            ref = hf(torch.tensor(tokens)).logits.numpy()
        ours = np.asarray(models.forward(m, tokens).logits)
        assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5, T
    prompt = rng.randint(1, V, (1, 5))
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(prompt), attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=8,
                             do_sample=False, pad_token_id=0).numpy()[0, 5:]
    ours = np.asarray(generate_tokens(m, jnp.asarray(prompt), jnp.ones((1, 5), jnp.int32), jax.random.key(0), (),
                                      jnp.asarray([-1], jnp.int32), max_new_tokens=8))[0]
    assert ours.tolist() == theirs.tolist()
    # the same model as llama.cpp writes it (factors as rope_factors_* tensors, original context and attention
    # factor as metadata): the same logits beyond the original context
    g = models.load(str(write_gguf(tmp_path / "phi3-longrope.gguf", tmp_path / "phi3-longrope", "phi3")),
                    tokenizer=False)
    assert g.cfg.rope_scaling == dataclasses.replace(s, short_factor=g.cfg.rope_scaling.short_factor,
                                                     long_factor=g.cfg.rope_scaling.long_factor,
                                                     attention_factor=g.cfg.rope_scaling.attention_factor)
    np.testing.assert_allclose(g.cfg.rope_scaling.long_factor, s.long_factor, rtol=1e-6)
    tokens = rng.randint(1, V, (2, 20))
    np.testing.assert_allclose(np.asarray(models.forward(g, tokens).logits), np.asarray(models.forward(m, tokens).logits),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- a mixture of experts (Qwen3-MoE)


MOE = {
    "qwen3moe-softmax-topk": lambda: transformers.Qwen3MoeConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=48, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
        max_position_embeddings=64),
    "qwen3moe-norm-topk": lambda: transformers.Qwen3MoeConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=48, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
        max_position_embeddings=64),
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=64),
}


@pytest.fixture(scope="module", params=sorted(MOE))
def tiny_moe(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = random_hf_model(MOE[request.param](), path)
    return hf, models.load(str(path), tokenizer=False)


def test_moe_matches_transformers(tiny_moe):
    hf, m = tiny_moe
    assert m.cfg.n_experts == 6 and m.params["blocks"]["moe"]["W_gate"].shape == (3, 6, 32, 24)
    rng = np.random.RandomState(1)
    tokens = rng.randint(1, V, (2, 11))
    mask = np.ones_like(tokens)
    mask[1, :3] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                 output_hidden_states=True, output_router_logits=True)
    logits, acts = transformer.forward(m.params, m.cfg, tokens, mask, capture=("resid_pre", "mlp.router_logits"))
    valid = mask.astype(bool)
    assert _rel(logits, out.logits.numpy(), valid) < 1e-5
    for layer in range(m.cfg.n_layers):
        assert _rel(acts["resid_pre"][layer], out.hidden_states[layer].numpy(), valid) < 1e-5
        ref_router = out.router_logits[layer].numpy().reshape(2, 11, 6)
        assert _rel(acts["mlp.router_logits"][layer], ref_router, valid) < 1e-5
    prompt = rng.randint(1, V, (1, 6))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), attention_mask=torch.ones(1, 6, dtype=torch.long), max_new_tokens=5,
                          do_sample=False, pad_token_id=0, eos_token_id=None)[0, 6:].tolist()
    assert np.asarray(generate_tokens(m, prompt, np.ones_like(prompt), jax.random.key(0), max_new_tokens=5))[0].tolist() == ref


def test_moe_routing_is_intervenable_without_recompiling(tiny_moe):
    """Routing sites are data: ablate an expert or force a routing by editing `mlp.expert_weights`; the
    forward compiles once whatever the routing, and each expert's output is capturable."""
    _, m = tiny_moe
    tokens = np.random.RandomState(5).randint(1, V, (1, 8))
    _, acts = models.forward(m, tokens, capture=("mlp.expert_weights", "mlp.expert_out", "mlp_out"))
    w, eo = np.asarray(acts["mlp.expert_weights"]), np.asarray(acts["mlp.expert_out"])
    assert w.shape == (3, 1, 8, 6) and ((w > 0).sum(-1) == 2).all()
    np.testing.assert_allclose(np.einsum("lbte,lbted->lbtd", w, eo), acts["mlp_out"], atol=1e-5)

    fwd = jax.jit(lambda weights: transformer.forward(
        m.params, m.cfg, tokens, interventions=(I.Replace("mlp.expert_weights", weights),),
        capture=("mlp_out",))[1]["mlp_out"])
    only = np.zeros_like(w)
    only[..., 3] = 1.0  # every token of every layer to expert 3 alone
    forced = np.asarray(fwd(only))
    np.testing.assert_allclose(forced[0], eo[0, ..., 3, :], atol=1e-6)  # layer 0: expert 3 alone (later layers see
    assert np.abs(forced[1:] - eo[1:, ..., 3, :]).max() > 1e-6  # other inputs, so their expert outputs move too)
    ablated = w.copy()
    ablated[..., 0] = 0.0  # expert 0 removed from the mixture
    fwd(ablated)
    assert fwd._cache_size() == 1  # two routings, one program

    with pytest.raises(models.InputError, match="mixture-of-experts"):
        models.forward(_tiny("qwen3"), tokens % 64, capture=("mlp.router_logits",))
    with pytest.raises(models.InputError, match="dense MLP"):
        models.forward(m, tokens, capture=("mlp.pre",))


EXPERT_PARALLEL = textwrap.dedent("""
    import jax, numpy as np
    jax.config.update("jax_num_cpu_devices", 8)
    import models
    from jax.sharding import Mesh
    from models.testing import random_model, tiny_config
    from models.sharding import shard_batch, shard_params
    cfg = tiny_config("qwen3_moe", n_layers=2, d_mlp=24, qk_norm=True, n_experts=8, n_experts_used=2,
                      tie_embeddings=False)
    m = random_model(cfg, jax.random.key(0))
    tokens = np.random.RandomState(0).randint(0, 64, (4, 9))
    ref = np.asarray(models.forward(m, tokens).logits)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    sharded = m.replace_params(shard_params(m.params, mesh))
    w = sharded.params["blocks"]["moe"]["W_gate"]
    assert w.sharding.shard_shape(w.shape) == (2, 2, 32, 24), w.sharding  # 8 experts, 2 per model-axis device
    with jax.set_mesh(mesh):
        out = np.asarray(models.forward(sharded, shard_batch(tokens, mesh)).logits)
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    print("ERR", err)
    assert err < 1e-5
""")


def test_expert_parallel_forward_equals_one_device():
    """The `expert` logical axis maps to the mesh's "model" axis: each device holds a quarter of the experts
    (8 simulated CPU devices, 2 x 4), and the forward equals the single-device one."""
    proc = subprocess.run([sys.executable, "-c", EXPERT_PARALLEL], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ERR" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


GGUF_CONFIGS = {  # head_dim 128 for Qwen3, as in every Qwen3: transformers' GGUF reader keeps Qwen3Config's 128
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
        intermediate_size=80, max_position_embeddings=64, rms_norm_eps=1e-6),
    "phi3": lambda: transformers.Phi3Config(  # Phi-3's vocabulary: transformers' reader pads with id 32000
        vocab_size=32064, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        intermediate_size=80, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


@pytest.mark.parametrize("arch", sorted(GGUF_CONFIGS))
def test_from_gguf_matches_transformers(tmp_path, arch):
    """A GGUF in llama.cpp's layout for the family loads to the same logits as transformers' model of the
    directory it was written from; transformers' own GGUF reader of the same file, an independent check of the
    layout, agrees."""
    hf = random_hf_model(GGUF_CONFIGS[arch](), tmp_path / "hf")
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", tmp_path / "hf", arch)
    m = models.load(str(path), tokenizer=False)
    assert m.cfg.arch == arch and not m.cfg.tie_embeddings
    tokens = np.random.RandomState(0).randint(1, V, (2, 9))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                                   torch_dtype=torch.float32)(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(models.forward(m, tokens).logits)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5
    assert np.abs(theirs - ref).max() / np.abs(ref).max() < 1e-5


GGUF_MOE = {  # llama.cpp's names: Qwen3-MoE is "qwen3moe"; Mixtral is "llama" with experts (and permuted q/k rows)
    "qwen3moe": MOE["qwen3moe-norm-topk"], "llama": MOE["mixtral"]}  # llama.cpp renormalises the chosen experts


@pytest.mark.parametrize("gguf_arch", sorted(GGUF_MOE))
def test_moe_from_gguf_matches_transformers(tmp_path, gguf_arch):
    """A mixture of experts in llama.cpp's layout (experts stacked `[E, out, in]` in `ffn_{gate,up,down}_exps`,
    the router in `ffn_gate_inp`) loads to the logits of transformers' model of the directory it was written
    from; each expert is read as its own slice of the stacked tensor."""
    hf = random_hf_model(GGUF_MOE[gguf_arch](), tmp_path / "hf")
    path = write_gguf(tmp_path / f"tiny-{gguf_arch}.gguf", tmp_path / "hf", gguf_arch)
    m = models.load(str(path), tokenizer=False)
    assert m.cfg.arch == {"qwen3moe": "qwen3_moe", "llama": "mixtral"}[gguf_arch]
    assert (m.cfg.n_experts, m.cfg.n_experts_used, m.cfg.d_mlp, m.cfg.norm_topk_prob) == (6, 2, 24, True)
    tokens = np.random.RandomState(0).randint(1, V, (2, 9))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(models.forward(m, tokens).logits)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5


GGUF_OTHER = {  # llama.cpp layouts that transformers' GGUF reader does not read: checked against the HF model
    "gptneox": lambda: transformers.GPTNeoXConfig(  # d_head 16, rotary 4 of them
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        rotary_pct=0.25, max_position_embeddings=64, use_parallel_residual=True, tie_word_embeddings=False),
    "olmo2": lambda: transformers.Olmo2Config(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=False),
}


@pytest.mark.parametrize("gguf_arch", sorted(GGUF_OTHER))
def test_neox_and_olmo2_from_gguf_match_transformers(tmp_path, gguf_arch):
    """Pythia and OLMo 2 in llama.cpp's layouts (GPT-NeoX: its converter's `[Q; K; V]` reordering of the fused qkv
    rows, the rotary dimension and parallel residual in the metadata; OLMo 2: `post_attention_norm` /
    `post_ffw_norm`, full-width q/k norms, no q/k permutation) load to the logits of transformers' model of the
    directory they were written from."""
    hf = random_hf_model(GGUF_OTHER[gguf_arch](), tmp_path / "hf")
    path = write_gguf(tmp_path / f"tiny-{gguf_arch}.gguf", tmp_path / "hf", gguf_arch)
    m = models.load(str(path), tokenizer=False)
    ref_cfg = models.load(str(tmp_path / "hf"), tokenizer=False).cfg
    assert m.cfg.norm_eps == pytest.approx(ref_cfg.norm_eps, rel=1e-6)  # GGUF stores it as float32
    assert m.cfg == dataclasses.replace(ref_cfg, norm_eps=m.cfg.norm_eps)
    tokens = np.random.RandomState(0).randint(1, V, (2, 9))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(models.forward(m, tokens).logits)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5
