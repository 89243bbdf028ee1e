"""The streaming loader: parameters equal the file's tensors in our layout (bit for bit, float32 and bfloat16),
GGUF equals safetensors, chunked and sharded loads equal the whole one (8 simulated devices; two processes),
and the memory guard refuses before reading."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import loading
from models.errors import InsufficientMemoryError
from models.loading import load_gguf, load_hf_dir
from tests.models._gguf import write_gguf

ROOT = Path(__file__).resolve().parents[2]


def save_tiny(path: Path, family: str = "llama", dtype: str = "float32", layers: int = 2) -> Path:
    """A random tiny transformers model saved as a Hugging Face directory (non-trivial norms and biases)."""
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=32)
    hf = {"llama": lambda: transformers.LlamaConfig(**common, tie_word_embeddings=False),
          "qwen2": lambda: transformers.Qwen2Config(**common),
          "gemma3": lambda: transformers.Gemma3TextConfig(**common, head_dim=8, sliding_window=4, query_pre_attn_scalar=8),
          }[family]()
    model = transformers.AutoModelForCausalLM.from_config(hf)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    model.to(getattr(torch, dtype)).save_pretrained(path)
    return path


def _bits(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(a).view(f"u{np.asarray(a).dtype.itemsize}")
            for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}


def _expected(sd, hf: dict, gemma: bool) -> dict[str, np.ndarray]:
    """Our layout computed by hand from the torch state dict `sd` (numpy float32 arrays), per our param path."""
    L, D, H, K = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    d = hf.get("head_dim") or D // H
    lay = lambda n: np.stack([sd[f"model.layers.{i}.{n}"] for i in range(L)])
    one = np.float32(1.0) if gemma else np.float32(0.0)
    out = {
        "['embed']['W_E']": sd["model.embed_tokens.weight"],
        "['ln_final']['w']": sd["model.norm.weight"] + one,
        "['blocks']['ln1']['w']": lay("input_layernorm.weight") + one,
        "['blocks']['attn']['W_Q']": lay("self_attn.q_proj.weight").reshape(L, H, d, D).transpose(0, 3, 1, 2),
        "['blocks']['attn']['W_K']": lay("self_attn.k_proj.weight").reshape(L, K, d, D).transpose(0, 3, 1, 2),
        "['blocks']['attn']['W_V']": lay("self_attn.v_proj.weight").reshape(L, K, d, D).transpose(0, 3, 1, 2),
        "['blocks']['attn']['W_O']": lay("self_attn.o_proj.weight").transpose(0, 2, 1).reshape(L, H, d, D),
        "['blocks']['mlp']['W_gate']": lay("mlp.gate_proj.weight").transpose(0, 2, 1),
        "['blocks']['mlp']['W_in']": lay("mlp.up_proj.weight").transpose(0, 2, 1),
        "['blocks']['mlp']['W_out']": lay("mlp.down_proj.weight").transpose(0, 2, 1),
    }
    if gemma:
        out.update({"['blocks']['ln1_post']['w']": lay("post_attention_layernorm.weight") + one,
                    "['blocks']['ln2']['w']": lay("pre_feedforward_layernorm.weight") + one,
                    "['blocks']['ln2_post']['w']": lay("post_feedforward_layernorm.weight") + one,
                    "['blocks']['attn']['q_norm']['w']": lay("self_attn.q_norm.weight") + one,
                    "['blocks']['attn']['k_norm']['w']": lay("self_attn.k_norm.weight") + one})
    else:
        out["['blocks']['ln2']['w']"] = lay("post_attention_layernorm.weight")
    if "self_attn.q_proj.bias" in "".join(sd):
        out.update({"['blocks']['attn']['b_Q']": lay("self_attn.q_proj.bias").reshape(L, H, d),
                    "['blocks']['attn']['b_K']": lay("self_attn.k_proj.bias").reshape(L, K, d),
                    "['blocks']['attn']['b_V']": lay("self_attn.v_proj.bias").reshape(L, K, d)})
    if "lm_head.weight" in sd:
        out["['unembed']['W_U']"] = sd["lm_head.weight"].T
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_parameters_are_the_files_tensors_in_our_layout(family, tmp_path):
    """float32 from a float32 file, and bfloat16 end to end from a bfloat16 file: every parameter bit for bit
    what the hand-written layout of the file's tensors gives (Gemma's 1 + w norms added in float32)."""
    from safetensors.torch import load_file

    for dtype in ("float32", "bfloat16"):
        path = save_tiny(tmp_path / dtype, family, dtype)
        hf = json.loads((path / "config.json").read_text())
        sd = {k: v.float().numpy() for k, v in load_file(path / "model.safetensors").items()}  # exact for bfloat16
        cfg, params = load_hf_dir(path, dtype)
        want = {k: np.asarray(v, jnp.dtype(dtype)) for k, v in _expected(sd, hf, family == "gemma3").items()}
        have = jax.tree_util.tree_flatten_with_path(params)[0]
        assert {jax.tree_util.keystr(p) for p, _ in have} == set(want)
        for p, a in have:
            assert a.dtype == jnp.dtype(dtype), (p, a.dtype)
            np.testing.assert_array_equal(np.asarray(a).view(f"u{a.dtype.itemsize}"),
                                          want[jax.tree_util.keystr(p)].view(f"u{a.dtype.itemsize}"), err_msg=str(p))
        if dtype == "bfloat16":  # no rounding anywhere: the file's bfloat16 bits
            assert (np.asarray(params["embed"]["W_E"]).view("u2") == np.asarray(sd["model.embed_tokens.weight"],
                                                                                  jnp.bfloat16).view("u2")).all()


def test_gguf_equals_safetensors_and_chunked_equals_whole(tmp_path, monkeypatch):
    """The same weights as a float32 GGUF (q/k permuted as llama.cpp does) load bit-identical to the HF
    directory; filling every parameter in tiny chunks (row blocks, single layers) changes no bit."""
    hf_dir = save_tiny(tmp_path / "hf", "llama")
    gguf_path = write_gguf(tmp_path / "tiny.gguf", hf_dir)
    cfg, ref = load_hf_dir(hf_dir)
    gcfg, from_gguf, _ = load_gguf(gguf_path)
    assert gcfg.replace(n_ctx=cfg.n_ctx) == cfg.replace(norm_eps=gcfg.norm_eps)
    want = _bits(ref)
    for name, bits in _bits(from_gguf).items():
        np.testing.assert_array_equal(bits, want[name], err_msg=name)
    monkeypatch.setattr(loading, "CHUNK_BYTES", 512)  # W_E [64, 32] f32 = 8 KiB -> 16 row blocks
    for _, chunked in (load_hf_dir(hf_dir), load_gguf(gguf_path)[:2]):
        for name, bits in _bits(chunked).items():
            np.testing.assert_array_equal(bits, want[name], err_msg=name)


SHARDED = textwrap.dedent("""
    import json, sys, jax, numpy as np
    jax.config.update("jax_num_cpu_devices", 8)
    import models
    from jax.sharding import Mesh
    from models import loading
    from models.loading import load_gguf, load_hf_dir
    hf_dir, gguf_path = sys.argv[1:3]
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    bits = lambda p: {jax.tree_util.keystr(k): np.asarray(a).view(np.uint32) for k, a in jax.tree_util.tree_flatten_with_path(p)[0]}
    cfg, ref = load_hf_dir(hf_dir)
    want = bits(ref)
    loading.CHUNK_BYTES = 2048  # chunked fills on the mesh too
    for _, params, *_ in (load_hf_dir(hf_dir, mesh=mesh), load_gguf(gguf_path, mesh=mesh)):
        w_q, w_e = params["blocks"]["attn"]["W_Q"], params["embed"]["W_E"]
        assert w_q.sharding.shard_shape(w_q.shape) == (2, 32, 1, 8), w_q.sharding
        assert w_e.sharding.shard_shape(w_e.shape) == (16, 32), w_e.sharding
        for name, b in bits(params).items():
            assert (b == want[name]).all(), name
    m = models.load(hf_dir, "float32", mesh=mesh, tokenizer=False)
    tokens = np.arange(24).reshape(2, 12) % 64
    a = np.asarray(models.forward(m, tokens)[0])
    b = np.asarray(models.forward(m.replace_params(ref), tokens)[0])
    print("ERR", float(np.abs(a - b).max()))
    assert np.abs(a - b).max() < 1e-5
""")


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                PYTHONPATH=str(ROOT))


def test_sharded_load_equals_unsharded(tmp_path):
    """On a 2 x 4 mesh of simulated devices each parameter (from safetensors and from GGUF) is sharded by the
    rules and holds exactly the unsharded load's bits; the forward gives the same logits."""
    hf_dir = save_tiny(tmp_path / "hf", "llama")
    gguf_path = write_gguf(tmp_path / "tiny.gguf", hf_dir)
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(hf_dir), str(gguf_path)], capture_output=True, text=True,
                          timeout=600, env=_env(8), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ERR" in proc.stdout


WORKER = textwrap.dedent("""
    import sys
    from models import sharding as meshlib
    meshlib.initialize(sys.argv[1], 2, int(sys.argv[2]))
    import json, jax, numpy as np
    import models
    from models import loading
    from jax.experimental import multihost_utils
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    read = []
    get = loading._Safetensors.get
    loading._Safetensors.get = lambda self, name, rows=None: read.append(name) or get(self, name, rows)
    mesh = meshlib.sweep_mesh(model=4)  # heads, kv heads, mlp and vocab split over both processes
    m = models.load(sys.argv[3], "float32", mesh=mesh, tokenizer=False)
    w_in = m.params["blocks"]["mlp"]["W_in"]
    local = sorted({s.index[2].start for s in w_in.addressable_shards})
    assert len(local) == 2 and w_in.sharding.shard_shape(w_in.shape) == (2, 32, 12), (local, w_in.sharding)
    tokens = meshlib.replicate(np.arange(24, dtype=np.int32).reshape(2, 12) % 64, mesh)
    logits = multihost_utils.process_allgather(models.forward(m, tokens)[0], tiled=True)
    print("RESULT" + json.dumps({"logits": np.asarray(logits).tolist(), "w_in_columns": local, "reads": len(read)}))
""")


def test_two_processes_load_their_own_shards(tmp_path):
    """Two processes joined by jax.distributed (2 simulated devices each) load one checkpoint onto a 1 x 4
    "model" mesh: each holds only its devices' shards and the logits equal a single-process unsharded load."""
    hf_dir = save_tiny(tmp_path / "hf", "llama")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, f"127.0.0.1:{port}", str(i), str(hf_dir)], env=_env(2),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[6:]))
    assert results[0]["w_in_columns"] != results[1]["w_in_columns"]  # different devices, different shards
    m = models.load(str(hf_dir), "float32", tokenizer=False)
    ref = np.asarray(models.forward(m, np.arange(24, dtype=np.int32).reshape(2, 12) % 64)[0])
    for r in results:
        np.testing.assert_allclose(np.asarray(r["logits"]), ref, atol=1e-5, rtol=1e-5)


def test_memory_guard_names_both_numbers_before_reading(tmp_path, monkeypatch):
    hf_dir = save_tiny(tmp_path / "hf", "llama")
    cfg, _ = load_hf_dir(hf_dir)
    need = sum(int(np.prod(s)) * 2 for s in jax.tree.leaves(models.params.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)))
    monkeypatch.setattr(loading, "_available_host_bytes", lambda: 12_345)
    monkeypatch.setattr(loading._Safetensors, "get", lambda *a: pytest.fail("read a tensor before the memory check"))
    with pytest.raises(InsufficientMemoryError, match=rf"{re.escape(str(hf_dir))} needs {need:,} bytes .* only 12,345 bytes") as e:
        models.load(str(hf_dir), "bfloat16", tokenizer=False)
    assert isinstance(e.value, MemoryError)


@pytest.mark.slow
def test_real_gguf_parameters_equal_transformers_dequantisation(smollm2):
    """SmolLM2's streamed parameters equal transformers' own GGUF dequantisation (q/k un-permuted), bit for bit."""
    from tests.conftest import load_reference

    ref, _ = load_reference("smollm2-135m-instruct")
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    want = _expected(sd, {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
                          "num_key_value_heads": 3}, gemma=False)
    want.pop("['unembed']['W_U']", None)
    have = _bits(smollm2.params)
    assert set(have) == set(want)
    for name, w in want.items():
        np.testing.assert_array_equal(have[name], np.ascontiguousarray(w, np.float32).view(np.uint32), err_msg=name)
