"""SAE files: our format, SAELens's (`cfg.json` + `sae_weights.safetensors`), and Gemma Scope's.

    saes.save(sae, "runs/x/saes/L10.resid_post");  sae = saes.load("runs/x/saes/L10.resid_post")
    saes.to_saelens(sae, "export/", model_name="smollm2-135m-instruct")   # loads with sae_lens.SAE.load_from_disk
    sae = saes.from_saelens("export/")
    sae = saes.load_gemma_scope("params.npz", site="resid_post", layer=20)

Ours: `sae.safetensors` (our array names, `act_scale` included) and `sae.json` (architecture, sizes, site,
layer, k / bandwidth, free-form `meta`). SAELens: the normalisation factor is folded into the weights
(`normalize_activations: "none"`), names are SAELens's (`W_enc [d_in, d_sae]`, `b_enc`, `W_dec [d_sae, d_in]`,
`b_dec`, `threshold` for JumpReLU, `b_gate`/`r_mag`/`b_mag` for Gated), our `relu` is SAELens's `standard`,
and BatchTopK is written as a JumpReLU with its inference threshold on every feature (as SAELens does).
Sites map to TransformerLens hook names (`resid_post` at layer 10 -> `blocks.10.hook_resid_post`).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from models.errors import InputError
from saes import sae as sae_lib
from saes.sae import SAE

__all__ = ["TL_HOOKS", "from_saelens", "load", "load_gemma_scope", "load_run", "save", "tl_hook_name", "to_saelens"]

FORMAT = "interp-sae"

# our site name -> TransformerLens hook (inside `blocks.{layer}.` for layer sites)
TL_HOOKS = {
    "embed": "hook_embed", "resid_pre": "hook_resid_pre", "ln1.normalized": "ln1.hook_normalized",
    "attn.q": "attn.hook_q", "attn.k": "attn.hook_k", "attn.v": "attn.hook_v", "attn.scores": "attn.hook_attn_scores",
    "attn.pattern": "attn.hook_pattern", "attn.z": "attn.hook_z", "attn.head_out": "attn.hook_result",
    "attn_out": "hook_attn_out", "resid_mid": "hook_resid_mid", "ln2.normalized": "ln2.hook_normalized",
    "mlp.pre": "mlp.hook_pre", "mlp.post": "mlp.hook_post", "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post", "final_norm": "ln_final.hook_normalized",
}
_TL_TO_SITE = {v: k for k, v in TL_HOOKS.items()}
_TO_SAELENS = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "gated": "gated"}
_FROM_SAELENS = {"standard": "relu", "topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu", "gated": "gated"}


def tl_hook_name(site: str, layer: int) -> str:
    hook = TL_HOOKS[site]
    return hook if site in ("embed", "final_norm") or layer < 0 else f"blocks.{layer}.{hook}"


def parse_tl_hook(name: str) -> tuple[str, int]:
    """(site, layer) of a TransformerLens hook name (layer -1 for model-level hooks)."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit():
        rest = ".".join(parts[2:])
        if rest in _TL_TO_SITE:
            return _TL_TO_SITE[rest], int(parts[1])
    if name in _TL_TO_SITE:
        return _TL_TO_SITE[name], -1
    raise InputError(f"no site corresponds to the TransformerLens hook {name!r}")


# ----------------------------------------------------------------------------- ours


def save(sae: SAE, path: str | Path, meta: dict | None = None) -> Path:
    """Write `sae` to the directory `path` (ours: `sae.safetensors` + `sae.json`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in sae_lib.arrays(sae).items()}, str(path / "sae.safetensors"))
    info = dict(format=FORMAT, version=1, **sae.config(), meta=meta or {})
    (path / "sae.json").write_text(json.dumps(info, indent=1, default=str))
    return path


def load(path: str | Path) -> SAE:
    """An SAE from a directory written by `save` (or SAELens's format, recognised by its `cfg.json`)."""
    path = Path(path)
    if (path / "cfg.json").exists() and not (path / "sae.json").exists():
        return from_saelens(path)
    info_path = path / "sae.json"
    if not info_path.exists():
        raise InputError(f"{path} holds no SAE (no sae.json or cfg.json)")
    info = json.loads(info_path.read_text())
    if info.get("format") != FORMAT:
        raise InputError(f"{info_path} is not an {FORMAT} file")
    arrays = load_file(str(path / "sae.safetensors"))
    return sae_lib.from_arrays(info["arch"], arrays, site=info.get("site", ""), layer=info.get("layer", -1),
                               k=info.get("k", 32), bandwidth=info.get("bandwidth", 0.05))


def load_run(out: str | Path) -> dict[str, SAE]:
    """Every SAE a training run wrote (`out/saes/<hook>/`), by hook name."""
    root = Path(out) / "saes"
    if not root.is_dir():
        raise InputError(f"{out} has no saes/ directory (has the run finished?)")
    return {p.name: load(p) for p in sorted(root.iterdir()) if (p / "sae.json").exists()}


# ----------------------------------------------------------------------------- SAELens


def to_saelens(sae: SAE, path: str | Path, *, model_name: str = "", context_size: int | None = None,
               dataset_path: str | None = None, dtype: str = "float32") -> Path:
    """Write `sae` in SAELens's on-disk format (loadable with `sae_lens.SAE.load_from_disk(path)`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    s = sae.fold_scale()
    arch = _TO_SAELENS[s.arch]
    w = {"W_enc": s.W_enc, "W_dec": s.W_dec, "b_dec": s.b_dec}
    if s.arch == "gated":
        w.update(b_gate=s.b_enc, r_mag=s.r_mag, b_mag=s.b_mag)
    else:
        w["b_enc"] = s.b_enc
    if s.arch == "jumprelu":
        w["threshold"] = s.threshold
    if s.arch == "batchtopk":
        w["threshold"] = jnp.full((s.width,), jnp.maximum(s.threshold, 0.0))
    save_file({k: np.ascontiguousarray(np.asarray(v, dtype)) for k, v in w.items()}, str(path / "sae_weights.safetensors"))
    metadata = dict(model_name=model_name, hook_name=tl_hook_name(s.site, s.layer) if s.site else "",
                    hook_head_index=None, prepend_bos=True, exclude_special_tokens=True,
                    exported_from="interp", interp_arch=s.arch)
    if context_size is not None:
        metadata["context_size"] = context_size
    if dataset_path is not None:
        metadata["dataset_path"] = dataset_path
    cfg = dict(d_in=s.d_in, d_sae=s.width, dtype=dtype, device="cpu", apply_b_dec_to_input=True,
               normalize_activations="none", reshape_activations="hook_z" if s.site == "attn.z" else "none",
               metadata=metadata, architecture=arch)
    if arch == "topk":
        cfg.update(k=int(s.k), rescale_acts_by_decoder_norm=False)
    (path / "cfg.json").write_text(json.dumps(cfg, indent=1))
    return path


def from_saelens(path: str | Path) -> SAE:
    """An SAE from SAELens's on-disk format (`cfg.json` + `sae_weights.safetensors`)."""
    path = Path(path)
    cfg = json.loads((path / "cfg.json").read_text())
    weights = load_file(str(path / "sae_weights.safetensors"))
    arch_name = cfg.get("architecture", "standard")
    if arch_name not in _FROM_SAELENS:
        raise InputError(f"SAELens architecture {arch_name!r} is not supported (known: {', '.join(_FROM_SAELENS)})")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise InputError(f"SAELens SAE with normalize_activations={cfg['normalize_activations']!r}: fold the "
                         "normalisation into the weights first (sae.fold_activation_norm_scaling_factor)")
    if not cfg.get("apply_b_dec_to_input", True):
        weights = dict(weights)  # pre = x W_enc + b_enc: fold b_dec W_enc into b_enc, ours subtracts b_dec first
        key = "b_gate" if arch_name == "gated" else "b_enc"
        weights[key] = weights[key] + weights["b_dec"] @ weights["W_enc"]
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or ""
    site, layer = parse_tl_hook(hook) if hook else ("", -1)
    arch = _FROM_SAELENS[arch_name]
    arrays = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    if cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens TopK: pre * |W_dec_i| before the top-k, f / |W_dec_i| before decoding; fold the norms in
        # (as SAELens's fold_W_dec_norm does) so unit-norm decoder rows give the same function
        n = np.linalg.norm(arrays["W_dec"], axis=-1)
        arrays.update(W_enc=arrays["W_enc"] * n[None, :], b_enc=arrays["b_enc"] * n, W_dec=arrays["W_dec"] / n[:, None])
    if arch == "gated":
        arrays["b_enc"] = arrays.pop("b_gate")
    if arch == "batchtopk" and "threshold" not in arrays:
        arrays["threshold"] = np.asarray(arrays.pop("topk_threshold", -1.0), np.float32)
    return sae_lib.from_arrays(arch, arrays, site=site, layer=layer, k=int(cfg.get("k", 32)))


# ----------------------------------------------------------------------------- Gemma Scope


def load_gemma_scope(path: str | Path, *, site: str = "resid_post", layer: int = -1) -> SAE:
    """A Gemma Scope JumpReLU SAE from its `params.npz` (or a safetensors file with the same names:
    `W_enc [d_model, width]`, `b_enc`, `W_dec [width, d_model]`, `b_dec`, `threshold`), computing exactly
    Gemma Scope's `f = relu(x W_enc + b_enc) * (x W_enc + b_enc > threshold)`, `x_hat = f W_dec + b_dec`.
    Gemma Scope's residual-stream SAEs read `resid_post` (e.g. `layer_20/width_16k/...` -> layer=20)."""
    path = Path(path)
    if path.is_dir():
        for name in ("params.npz", "params.safetensors", "sae_weights.safetensors"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise InputError(f"no params.npz or .safetensors file in {path}")
    if path.suffix == ".npz":
        with np.load(path) as z:
            arrays = {k: np.asarray(z[k], np.float32) for k in z.files}
    elif path.suffix == ".safetensors":
        arrays = {k: np.asarray(v, np.float32) for k, v in load_file(str(path)).items()}
    else:
        raise InputError(f"{path}: expected a .npz or .safetensors file")
    missing = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"} - set(arrays)
    if missing:
        raise InputError(f"{path} lacks {sorted(missing)} (Gemma Scope files hold W_enc, b_enc, W_dec, b_dec, threshold)")
    # Gemma Scope encodes x @ W_enc + b_enc (b_dec is not subtracted first); ours subtracts b_dec, so fold it in
    arrays["b_enc"] = arrays["b_enc"] + arrays["b_dec"] @ arrays["W_enc"]
    return sae_lib.from_arrays("jumprelu", arrays, site=site, layer=layer)
