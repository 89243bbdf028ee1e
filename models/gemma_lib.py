"""Interop with Google DeepMind's `gemma` library (Flax): its Gemma 2 / Gemma 3 parameter trees and checkpoints.

Their tree is what `gm.nn.Transformer.init` returns and `gm.ckpts.save_params` writes as an orbax
checkpoint (the library's NESTED layout), for `N` heads, `K` kv heads, head size `H`:

    embedder/input_embedding [V, D]
    layer_{i}/pre_attention_norm/scale [D]      every RMSNorm computes x * (1 + scale): we store 1 + scale
    layer_{i}/attn/q_einsum/w [N, D, H]   kv_einsum/w [2, K, D, H]   (qkv_einsum/w [3, N, D, H] when K == N)
    layer_{i}/attn/attn_vec_einsum/w [N, H, D]   _query_norm/scale, _key_norm/scale [H] (Gemma 3)
    layer_{i}/post_attention_norm, pre_ffw_norm, post_ffw_norm /scale [D]
    layer_{i}/mlp/gating_einsum [2, F, D] (`transpose_gating_einsum`, Gemma 3) or [2, D, F]: [0] goes through
        GELU (our W_gate), [1] is our W_in          layer_{i}/mlp/linear [F, D]
    final_norm/scale [D]

The library itself is not needed here (orbax reads and writes the files); `transformer_config` builds its
`TransformerConfig` when it is installed. Their checkpoints carry no config: pass ours, or build it from
theirs with `config_from_gemma`. Their RMSNorm epsilon is fixed at 1e-6 and their GELU is the tanh one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from models.config import Config, RopeScaling
from models.errors import ModelFileError, UnsupportedModelError
from models.params import Params, param_shapes

Tree = dict[str, Any]
GEMMA_ARCHS = ("gemma2", "gemma3")
_ATTN_TYPES = {"LOCAL_SLIDING": "local", "GLOBAL": "global"}


def _check_representable(cfg: Config) -> None:
    """Raise UnsupportedModelError if `cfg` is not a model the gemma library's Transformer can express."""
    problems = []
    if cfg.arch not in GEMMA_ARCHS:
        problems.append(f"arch {cfg.arch!r} (supported: {', '.join(GEMMA_ARCHS)})")
    else:
        for field, want in (("norm", "rms"), ("act", "gelu_tanh"), ("gated_mlp", True),
                            ("positional", "rope"), ("post_norms", True), ("tie_embeddings", True),
                            ("qkv_bias", False), ("o_bias", False), ("mlp_bias", False)):
            if getattr(cfg, field) != want:
                problems.append(f"{field}={getattr(cfg, field)!r} (the gemma library has {want!r})")
        for field, want in (("norm_eps", 1e-6), ("embed_scale", cfg.d_model**0.5)):  # float32 metadata: 1e-6 + 2.5e-14
            if not math.isclose(getattr(cfg, field), want, rel_tol=1e-6):
                problems.append(f"{field}={getattr(cfg, field)!r} (the gemma library has {want!r})")
        if cfg.rope_scaling is not None and (cfg.rope_scaling.kind != "linear" or cfg.rope_local_theta is None):
            problems.append(f"rope_scaling {cfg.rope_scaling} (the gemma library scales global layers only, linearly)")
    if problems:
        raise UnsupportedModelError("the gemma library cannot express this model: " + "; ".join(problems))


def _check_shapes(params: Params, cfg: Config, source: str) -> None:
    """Raise ModelFileError naming every parameter missing, unexpected or shaped unlike `cfg` implies."""
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)  # noqa: E731
    want = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=is_shape)[0]}
    have = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    problems = [f"{k}: {'missing' if k not in have else f'shape {have[k]}, the config implies {s}'}"
                for k, s in want.items() if have.get(k) != s] + [f"{k}: unexpected" for k in have if k not in want]
    if problems:
        raise ModelFileError(f"{source} do not match the config: " + "; ".join(problems[:8]))


def _default_transpose(cfg: Config) -> bool:
    return cfg.arch == "gemma3"  # the library's Gemma 3 presets use [2, F, D]; Gemma2_2B [2, D, F], Gemma2_9B [2, F, D]


def to_gemma_params(params: Params, cfg: Config, transpose_gating_einsum: bool | None = None) -> Tree:
    """Our parameters -> the gemma library's nested tree (numpy arrays, dtype kept).

    `transpose_gating_einsum` picks the MLP gate layout: default as the library's Gemma 3 and Gemma2_2B presets
    ([2, F, D] for Gemma 3, [2, D, F] for Gemma 2); pass the target preset's `config.transpose_gating_einsum`
    (Gemma2_9B has True). Loading infers it from the shape."""
    _check_representable(cfg)
    _check_shapes(params, cfg, "params")
    transpose = _default_transpose(cfg) if transpose_gating_einsum is None else transpose_gating_einsum
    np_ = jax.tree.map(np.asarray, params)
    b, a, mlp = np_["blocks"], np_["blocks"]["attn"], np_["blocks"]["mlp"]
    scale = lambda w: {"scale": w - 1}  # noqa: E731  (1 + scale) convention
    tree: Tree = {"embedder": {"input_embedding": np_["embed"]["W_E"]}, "final_norm": scale(np_["ln_final"]["w"])}
    for i in range(cfg.n_layers):
        q, k, v = (a[n][i].transpose(1, 0, 2) for n in ("W_Q", "W_K", "W_V"))  # [D, N, H] -> [N, D, H]
        attn: Tree = {"attn_vec_einsum": {"w": a["W_O"][i]}}
        if cfg.n_kv_heads == cfg.n_heads:
            attn["qkv_einsum"] = {"w": np.stack([q, k, v])}
        else:
            attn.update(q_einsum={"w": q}, kv_einsum={"w": np.stack([k, v])})
        if cfg.qk_norm:
            attn.update(_query_norm=scale(a["q_norm"]["w"][i]), _key_norm=scale(a["k_norm"]["w"][i]))
        gating = np.stack([mlp["W_gate"][i], mlp["W_in"][i]])  # [2, D, F]
        tree[f"layer_{i}"] = {
            "pre_attention_norm": scale(b["ln1"]["w"][i]), "attn": attn,
            "post_attention_norm": scale(b["ln1_post"]["w"][i]), "pre_ffw_norm": scale(b["ln2"]["w"][i]),
            "post_ffw_norm": scale(b["ln2_post"]["w"][i]),
            "mlp": {"gating_einsum": gating.transpose(0, 2, 1) if transpose else gating, "linear": mlp["W_out"][i]},
        }
    return tree


def from_gemma_params(tree: Mapping[str, Any], cfg: Config, source: str = "gemma params") -> Params:
    """The gemma library's nested tree (or a Kauldron train state holding it under `params`) -> our parameters,
    checked against `cfg`. Raises ModelFileError naming a missing or mis-shaped tensor."""
    _check_representable(cfg)
    if set(tree) >= {"params", "step"}:  # a Kauldron checkpoint: the model's params plus optimizer state
        tree = tree["params"]
    if "vision_encoder" in tree:
        tree = {k: v for k, v in tree.items() if k != "vision_encoder"}  # text tower only
    L, D, F = cfg.n_layers, cfg.d_model, cfg.d_mlp

    def get(*path):
        node = tree
        for i, key in enumerate(path):
            if not isinstance(node, Mapping) or key not in node:
                raise ModelFileError(f"{source}: {'/'.join(path[: i + 1])} is missing (expected the gemma library's "
                                     f"nested layout for {L} layers)")
            node = node[key]
        return np.asarray(node, np.float32)

    extra = sorted(k for k in tree if k.startswith("layer_") and k not in {f"layer_{i}" for i in range(L)})
    if extra:
        raise ModelFileError(f"{source}: has {extra[:3]} beyond the config's {L} layers")
    layers = [f"layer_{i}" for i in range(L)]
    norm = lambda name: np.stack([get(l, name, "scale") for l in layers]) + 1  # noqa: E731

    def qkv(l):  # [3, N|K, D, H]: fused when K == N
        fused = isinstance(tree.get(l), Mapping) and "qkv_einsum" in tree[l].get("attn", {})
        return get(l, "attn", "qkv_einsum", "w") if fused else (get(l, "attn", "q_einsum", "w"), *get(l, "attn", "kv_einsum", "w"))

    qs, ks, vs = zip(*(qkv(l) for l in layers))
    gating = np.stack([get(l, "mlp", "gating_einsum") for l in layers])  # [L, 2, D, F] or [L, 2, F, D]
    if gating.shape[2:] == (F, D) and (D != F or _default_transpose(cfg)):
        gating = gating.transpose(0, 1, 3, 2)
    blocks: Params = {
        "ln1": {"w": norm("pre_attention_norm")}, "ln1_post": {"w": norm("post_attention_norm")},
        "ln2": {"w": norm("pre_ffw_norm")}, "ln2_post": {"w": norm("post_ffw_norm")},
        "attn": {"W_Q": np.stack(qs).transpose(0, 2, 1, 3), "W_K": np.stack(ks).transpose(0, 2, 1, 3),
                 "W_V": np.stack(vs).transpose(0, 2, 1, 3),
                 "W_O": np.stack([get(l, "attn", "attn_vec_einsum", "w") for l in layers])},
        "mlp": {"W_gate": gating[:, 0], "W_in": gating[:, 1],
                "W_out": np.stack([get(l, "mlp", "linear") for l in layers])},
    }
    if cfg.qk_norm:
        for ours, theirs in (("q_norm", "_query_norm"), ("k_norm", "_key_norm")):
            blocks["attn"][ours] = {"w": np.stack([get(l, "attn", theirs, "scale") for l in layers]) + 1}
    params = {"embed": {"W_E": get("embedder", "input_embedding")}, "blocks": blocks,
              "ln_final": {"w": get("final_norm", "scale") + 1}}
    _check_shapes(params, cfg, source)
    return jax.tree.map(lambda x: jnp.asarray(x, cfg.dtype), params)


CHECKSUM_FILE = "interp_sha256.json"  # beside orbax's files in a checkpoint we write (orbax ignores it)


def _tree_sha256(tree: Mapping) -> str:
    """SHA-256 over a nested tree's leaves (path, dtype, shape, bytes), in sorted path order."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_checkpoint(params: Params, cfg: Config, path: str | os.PathLike, **kw) -> None:
    """Write our parameters as the orbax checkpoint `gm.ckpts.save_params` writes (`path` must not exist);
    `gm.ckpts.load_params(path)` reads it back. `kw` goes to `to_gemma_params`. A SHA-256 of the tree goes into
    `CHECKSUM_FILE` inside the checkpoint, which `load_checkpoint` verifies (a bit flip is an error)."""
    import orbax.checkpoint as ocp

    tree = to_gemma_params(params, cfg, **kw)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.abspath(path), tree)
    ckpt.wait_until_finished()
    (Path(path) / CHECKSUM_FILE).write_text(json.dumps({"sha256": _tree_sha256(tree)}))


def load_checkpoint(path: str | os.PathLike, cfg: Config) -> Params:
    """Read an orbax checkpoint of the gemma library's params (as `gm.ckpts.save_params` writes) into ours.
    Unreadable or damaged files are a ModelFileError naming the checkpoint (and the file where orbax says
    which); a checkpoint we wrote is verified against its SHA-256."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ModelFileError(f"gemma checkpoint {path!r} is not a directory")
    if not os.path.exists(os.path.join(path, "_METADATA")) and not os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
        found = sorted(os.listdir(path))[:8]
        raise ModelFileError(f"gemma checkpoint {path!r} is not an orbax checkpoint: no _METADATA (holds {found})")
    try:
        tree = ocp.StandardCheckpointer().restore(path)
    except Exception as e:  # orbax/tensorstore raise JSONDecodeError, ValueError, ... without the path
        raise ModelFileError(f"gemma checkpoint {path!r} could not be restored (a damaged _METADATA, manifest.ocdbt "
                             f"or data file?): {type(e).__name__}: {str(e)[:500]}") from None
    if not isinstance(tree, Mapping):
        raise ModelFileError(f"gemma checkpoint {path!r} holds a {type(tree).__name__}, not a parameter tree")
    if any(str(k).startswith("transformer/") for k in tree):
        raise ModelFileError(f"{path}: the gemma library's FLAT/STACKED release layout; load it with "
                             "gm.ckpts.load_params and save it with gm.ckpts.save_params first")
    checksum = Path(path) / CHECKSUM_FILE
    if checksum.exists():
        try:
            want = json.loads(checksum.read_text())["sha256"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelFileError(f"{checksum} is damaged ({type(e).__name__}: {e})") from None
        if _tree_sha256(tree) != want:
            raise ModelFileError(f"gemma checkpoint {path!r}: its contents do not match {CHECKSUM_FILE} (a damaged or "
                                 "bit-flipped data file)")
    return from_gemma_params(tree, cfg, source=path)


def _get(obj, name):
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


def config_from_gemma(tc: Any, n_ctx: int | None = None, dtype: str = "float32") -> Config:
    """Our Config for the gemma library's `TransformerConfig` (or a mapping with its field names, attention
    types as "LOCAL_SLIDING"/"GLOBAL" and `query_pre_attn_scalar` as the query multiplier). Gemma 3 is
    told from Gemma 2 by QK-norm; `n_ctx` (not in their config) defaults to 8192 (Gemma 2) / 32768 (Gemma 3)."""
    qk_norm = bool(_get(tc, "use_qk_norm"))
    arch = "gemma3" if qk_norm else "gemma2"
    types = tuple(_ATTN_TYPES[getattr(t, "name", t)] for t in _get(tc, "attention_types"))
    scalar = _get(tc, "query_pre_attn_scalar")
    local_theta, global_theta = float(_get(tc, "local_base_frequency")), float(_get(tc, "global_base_frequency"))
    if _get(tc, "local_scale_factor") != 1.0:
        raise UnsupportedModelError(f"local_scale_factor={_get(tc, 'local_scale_factor')}: we scale RoPE on global layers only")
    if arch == "gemma2" and local_theta != global_theta:
        raise UnsupportedModelError(f"Gemma 2 with local_base_frequency {local_theta} != global {global_theta}")
    factor = float(_get(tc, "global_scale_factor"))
    D = int(_get(tc, "embed_dim"))
    return Config(
        arch=arch, vocab_size=int(_get(tc, "num_embed")), d_model=D, n_layers=len(types),
        n_heads=int(_get(tc, "num_heads")), n_kv_heads=int(_get(tc, "num_kv_heads")), d_head=int(_get(tc, "head_dim")),
        d_mlp=int(_get(tc, "hidden_dim")), n_ctx=n_ctx or (32768 if qk_norm else 8192), norm="rms", norm_eps=1e-6,
        act="gelu_tanh", gated_mlp=True, positional="rope", rope_theta=global_theta,
        rope_local_theta=local_theta if arch == "gemma3" else None,
        rope_scaling=RopeScaling("linear", factor) if factor != 1.0 else None,
        post_norms=True, qk_norm=qk_norm, embed_scale=D**0.5,
        attn_scale=float(scalar() if callable(scalar) else scalar),
        attn_softcap=_get(tc, "attn_logits_soft_cap"), final_softcap=_get(tc, "final_logit_softcap"),
        sliding_window=_get(tc, "sliding_window_size"), layer_types=types, tie_embeddings=True, dtype=dtype,
    )


def transformer_config(cfg: Config, transpose_gating_einsum: bool | None = None):
    """The gemma library's `TransformerConfig` for our `cfg` (needs the `gemma` package; see README)."""
    from gemma.gm.nn import _config, _modules  # noqa: PLC0415  (optional peer)

    _check_representable(cfg)
    scale = 1.0 / cfg.query_scale**2
    norm = _config.QueryPreAttentionNormalisation
    if abs(cfg.query_scale - cfg.d_head**-0.5) < 1e-12:
        qnorm = norm.BY_ONE_OVER_SQRT_HEAD_DIM
    elif abs(scale - cfg.d_model // cfg.n_heads) < 1e-6:
        qnorm = norm.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
    else:
        raise UnsupportedModelError(f"attn_scale {cfg.query_scale} is neither d_head**-0.5 nor (d_model // n_heads)**-0.5")
    types = {"local": _modules.AttentionType.LOCAL_SLIDING, "global": _modules.AttentionType.GLOBAL}
    local = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
    factor = cfg.rope_scaling.factor if cfg.rope_scaling is not None else 1.0
    return _config.TransformerConfig(
        num_embed=cfg.vocab_size, embed_dim=cfg.d_model, hidden_dim=cfg.d_mlp, num_heads=cfg.n_heads,
        head_dim=cfg.d_head, num_kv_heads=cfg.n_kv_heads, final_logit_softcap=cfg.final_softcap,
        use_post_attn_norm=True, use_post_ffw_norm=True, attention_types=tuple(types[t] for t in cfg.layer_types),
        query_pre_attn_norm=qnorm, attn_logits_soft_cap=cfg.attn_softcap, sliding_window_size=cfg.sliding_window,
        transpose_gating_einsum=_default_transpose(cfg) if transpose_gating_einsum is None else transpose_gating_einsum,
        use_qk_norm=cfg.qk_norm, local_base_frequency=local, global_base_frequency=cfg.rope_theta,
        global_scale_factor=factor,
    )
