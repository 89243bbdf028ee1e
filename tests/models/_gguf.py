"""One GGUF writer for the tests: a Hugging Face directory as a float32 GGUF in llama.cpp's layout for its
architecture (what `convert_hf_to_gguf.py` writes), so the loader is tested against files it did not write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
         "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "self_attn.qkv_proj": "attn_qkv",  # Phi-3's fused
         "mlp.gate_up_proj": "ffn_up", "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp"}
EXPERT = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",  # Qwen3-MoE
          "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}  # Mixtral
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
OLMO2 = {"post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_ffw_norm"}
NEOX = {"input_layernorm": "attn_norm", "attention.query_key_value": "attn_qkv", "attention.dense": "attn_output",
        "post_attention_layernorm": "ffn_norm", "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}
NEOX_TOP = {"gpt_neox.embed_in.weight": "token_embd.weight", "gpt_neox.final_layer_norm.weight": "output_norm.weight",
            "gpt_neox.final_layer_norm.bias": "output_norm.bias", "embed_out.weight": "output.weight"}


def _permute(w: np.ndarray, n: int) -> np.ndarray:
    """llama.cpp's rotary permutation of q/k rows (llama and Mixtral files only)."""
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, hf_dir: Path, arch: str = "llama", block_count: int | None = None,
               vocab_size: int | None = None, extra: dict | None = None) -> Path:
    """The HF directory `hf_dir` as a float32 GGUF of llama.cpp architecture `arch` (llama, qwen3, qwen3moe, phi3,
    olmo2, gptneox; Mixtral is `llama` with experts). `block_count` / `vocab_size` override the metadata (to test
    the loader's checks). llama.cpp's conventions (its `convert_hf_to_gguf.py`): q/k rows permuted for llama,
    experts stacked `[E, out, in]`, GPT-NeoX's fused qkv rows reordered from per-head `(q, k, v)` to `[Q; K; V]`,
    head sizes and the rotary dimension written for the others."""
    if arch == "gptneox":
        return _write_neox(path, hf_dir)
    import gguf
    from safetensors.numpy import load_file

    hf = json.loads((Path(hf_dir) / "config.json").read_text())
    sd = load_file(Path(hf_dir) / "model.safetensors")
    H, K = hf["num_attention_heads"], hf["num_key_value_heads"]
    d_head = hf.get("head_dim") or hf["hidden_size"] // H
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(block_count or hf["num_hidden_layers"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(K)
    if arch != "llama":
        w.add_key_length(d_head)
        w.add_value_length(d_head)
        w.add_rope_dimension_count(d_head)
    w.add_context_length(hf["max_position_embeddings"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_freq_base(theta)
    w.add_vocab_size(vocab_size or hf["vocab_size"])
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if arch == "phi3" and rope.get("rope_type", rope.get("type")) == "longrope":  # as llama.cpp's Phi3MiniModel
        orig = rope.get("original_max_position_embeddings") or hf["original_max_position_embeddings"]
        scale = hf["max_position_embeddings"] / orig
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_attn_factors(np.sqrt(1 + np.log(scale) / np.log(orig)) if scale > 1 else 1.0)
        extra = {"rope_factors_long.weight": np.asarray(rope["long_factor"]),
                 "rope_factors_short.weight": np.asarray(rope["short_factor"]), **(extra or {})}
    n_experts = hf.get("num_experts") or hf.get("num_local_experts")
    if n_experts:
        w.add_expert_count(n_experts)
        w.add_expert_used_count(hf["num_experts_per_tok"])
        if hf.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(hf["moe_intermediate_size"])
    experts: dict[str, dict[int, np.ndarray]] = {}  # stacked name -> {expert: [out, in]}
    for name, t in sd.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            if ".experts." in module:  # mlp.experts.{e}.gate_proj / block_sparse_moe.experts.{e}.w1
                e, proj = module.split(".experts.")[1].split(".")
                experts.setdefault(f"blk.{i}.{EXPERT[proj]}.{leaf}", {})[int(e)] = t
                continue
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                t = _permute(t, H if module == "self_attn.q_proj" else K)
            name = f"blk.{i}.{(OLMO2 if arch == 'olmo2' and module in OLMO2 else LAYER)[module]}.{leaf}"
        else:
            name = TOP[name]
        w.add_tensor(name, np.ascontiguousarray(t, np.float32))
    for name, per in experts.items():
        w.add_tensor(name, np.ascontiguousarray(np.stack([per[e] for e in sorted(per)]), np.float32))
    for name, t in (extra or {}).items():
        w.add_tensor(name, np.ascontiguousarray(t, np.float32))
    return _finish(w, path)


def _write_neox(path: Path, hf_dir: Path) -> Path:
    """A GPT-NeoX (Pythia) directory as llama.cpp writes it: metadata `gptneox.*` (rotary dimension, parallel
    residual, LayerNorm epsilon), the fused qkv rows as `[Q; K; V]`."""
    import gguf
    from safetensors.numpy import load_file

    hf = json.loads((Path(hf_dir) / "config.json").read_text())
    sd = load_file(Path(hf_dir) / "model.safetensors")
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    frac = hf.get("rotary_pct") or (hf.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
    w = gguf.GGUFWriter(str(path), "gptneox")
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(D)
    w.add_block_count(hf["num_hidden_layers"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_rope_dimension_count(int(frac * (D // H)))
    w.add_head_count(H)
    w.add_parallel_residual(hf.get("use_parallel_residual", True))
    w.add_layer_norm_eps(hf["layer_norm_eps"])
    w.add_vocab_size(hf["vocab_size"])
    for name, t in sd.items():
        if name.startswith("gpt_neox.layers."):
            _, _, i, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            if module == "attention.query_key_value":  # per head (q, k, v) -> [Q; K; V]
                t = t.reshape(H, 3, -1, *t.shape[1:]).swapaxes(0, 1).reshape(t.shape)
            name = f"blk.{i}.{NEOX[module]}.{leaf}"
        elif name in NEOX_TOP:
            name = NEOX_TOP[name]
        else:
            continue  # buffers (attention.bias / masked_bias of old checkpoints)
        w.add_tensor(name, np.ascontiguousarray(t, np.float32))
    return _finish(w, path)


def _finish(w, path: Path) -> Path:
    """Write the header, metadata and tensors `w` holds to `path`, and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
