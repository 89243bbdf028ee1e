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
An SAE's (site, layer) is a `models.Hook` (layer `None` for model sites); its TransformerLens name is
`Hook.tl` (`Hook("resid_post", 10).tl == "blocks.10.hook_resid_post"`).
"""

from __future__ import annotations

import functools
import json
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from models.errors import InputError
from models.loading import hf_id, resolve
from models.sites import SITES, Hook
from models.tokenizer import from_gguf, from_hf_dir
from saes.core import cross_layer, sae as sae_lib
from saes.core.cross_layer import CrossLayerTranscoder
from saes.core.files import contained_file, read_json, read_safetensors
from saes.core.sae import SAE, check_arrays
from saes.io import circuit_tracer

__all__ = ["TL_HOOKS", "check_arrays", "contained_file", "from_saelens", "load", "load_clt", "load_gemma_scope", "load_run",
           "save", "save_clt", "to_saelens"]

FORMAT = "interp-sae"
CLT_FORMAT = "interp-clt"

# our site name -> TransformerLens hook (inside `blocks.{layer}.` for layer sites), from the site registry
TL_HOOKS = {name: site.tl for name, site in SITES.items()}
_TO_SAELENS = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "gated": "gated"}
_FROM_SAELENS = {"standard": "relu", "topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu", "gated": "gated"}


# ----------------------------------------------------------------------------- ours


def save(sae: SAE, path: str | Path, meta: dict | None = None) -> Path:
    """Write `sae` to the directory `path` (ours: `sae.safetensors` + `sae.json`; a cross-layer transcoder:
    `save_clt`)."""
    if isinstance(sae, CrossLayerTranscoder):
        return save_clt(sae, path, meta)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in sae_lib.arrays(sae).items()}, str(path / "sae.safetensors"))
    info = dict(format=FORMAT, version=1, **sae.config(), meta=meta or {})
    (path / "sae.json").write_text(json.dumps(info, indent=1, default=str))
    return path


def load(path: str | Path, model=None) -> SAE:
    """An SAE from a directory written by `save` (or SAELens's format, recognised by its `cfg.json`).

    Shapes are checked against each other (`check_arrays`) and, given `model` (a `models.Model` or
    `models.Config`), against the width of the SAE's site and the model's layers; any mismatch, missing
    array, non-finite value, unreadable or truncated file is an InputError naming the file."""
    path = Path(path)
    if (path / "cfg.json").exists() and not (path / "sae.json").exists():
        return from_saelens(path, model)
    info_path = path / "sae.json"
    if not info_path.exists():
        raise InputError(f"{path} holds no SAE (no sae.json or cfg.json)")
    info = read_json(info_path)
    if info.get("format") != FORMAT:
        raise InputError(f"{info_path} is not an {FORMAT} file")
    if info.get("arch") not in sae_lib.ARCHS:
        raise InputError(f"{info_path}: arch {info.get('arch')!r} is not one of {', '.join(sae_lib.ARCHS)}")
    weights = path / "sae.safetensors"
    arrays = read_safetensors(weights)
    site, layer, k = info.get("site", ""), info.get("layer"), info.get("k", 32)
    layer = None if layer is None or layer == -1 else layer  # -1: "no layer" in files before models.Hook
    target = info.get("target")
    if target is not None and (target not in SITES or not SITES[target].per_layer):
        raise InputError(f"{info_path}: target {target!r} (a transcoder's output) is not a layer site of models.sites")
    check_arrays(weights, info["arch"], arrays, k=k, site=site, layer=layer, model=model, d_in=info.get("d_in"),
                 width=info.get("width"))
    return sae_lib.from_arrays(info["arch"], arrays, site=site, layer=layer, k=k, bandwidth=info.get("bandwidth", 0.05),
                               target=target)


# arrays of each architecture (our names) and their shapes in terms of d = d_in and w = width; () = scalar
def save_clt(clt: CrossLayerTranscoder, path: str | Path, meta: dict | None = None) -> Path:
    """Ours: `clt.safetensors` (the arrays, `act_scale` included) and `clt.json` (`clt.config()`, `meta`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays = {n: np.ascontiguousarray(np.asarray(getattr(clt, n), np.float32)) for n in cross_layer.ARRAY_SHAPES
              if getattr(clt, n) is not None}
    save_file(arrays, str(path / "clt.safetensors"))
    (path / "clt.json").write_text(json.dumps(dict(format=CLT_FORMAT, version=1, **clt.config(), meta=meta or {}),
                                              indent=1, default=str))
    return path


def load_clt(path: str | Path, model=None) -> CrossLayerTranscoder:
    """A CLT written by `save_clt` (or a directory of circuit-tracer's CLT files: `saes.io.circuit_tracer.read_clt`); checked
    against `model`'s config when given."""
    path = Path(path)
    if not (path / "clt.json").exists() and (path / "W_enc_0.safetensors").exists():
        clt = circuit_tracer.read_clt(path)
    else:
        info = read_json(path / "clt.json")
        if info.get("format") != CLT_FORMAT:
            raise InputError(f"{path / 'clt.json'} is not an {CLT_FORMAT} file")
        clt = cross_layer.from_arrays(path / "clt.safetensors", info, read_safetensors(path / "clt.safetensors"))
    if model is not None:
        clt.check(getattr(model, "cfg", model))
    return clt


def load_run(out: str | Path, model=None) -> dict[str, SAE]:
    """Every SAE a training run wrote (`out/saes/<hook>/`), by hook name (each checked as `load` does; a
    cross-layer transcoder's `clt/` by `load_clt`)."""
    root = Path(out) / "saes"
    if not root.is_dir():
        raise InputError(f"{out} has no saes/ directory (has the run finished?)")
    return {p.name: load(p, model) if (p / "sae.json").exists() else load_clt(p, model) for p in sorted(root.iterdir())
            if (p / "sae.json").exists() or (p / "clt.json").exists()}


# ----------------------------------------------------------------------------- SAELens


def to_saelens(sae: SAE, path: str | Path, *, model_name: str = "", context_size: int | None = None,
               dataset_path: str | None = None, dtype: str = "float32", prepend_bos: bool | None = None) -> Path:
    """Write `sae` in SAELens's on-disk format (loadable with `sae_lens.SAE.load_from_disk(path)`).

    `prepend_bos` (SAELens metadata) says whether the training rows began with the tokenizer's BOS. None:
    what `saes.train.loop` did for `model_name`, whose rows (`saes.train.data.TokenRows`) start with BOS when the
    tokenizer has one (SmolLM2: `<|im_start|>`, id 1, although its own prompts get none) and with the pad
    token otherwise. Give it explicitly for SAEs trained on other activations."""
    if sae.target:
        raise InputError(f"to_saelens: {sae.hook} is a transcoder (predicts {sae.target}); SAELens's SAE format would "
                         "centre its input by the output bias. Write its set with saes.io.circuit_tracer.write")
    if prepend_bos is None:
        prepend_bos = _rows_start_with_bos(model_name)
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
    metadata = dict(model_name=hf_id(model_name), hook_name=Hook(s.site, s.layer).tl if s.site else "",
                    hook_head_index=None, prepend_bos=bool(prepend_bos), exclude_special_tokens=True,
                    exported_from="interp", interp_arch=s.arch, interp_model=model_name)
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


@functools.lru_cache(maxsize=8)
def _rows_start_with_bos(model_name: str) -> bool:
    """Whether `saes.train.data.TokenRows` starts rows for `model_name` with BOS (its tokenizer has one)."""
    if not model_name:
        raise InputError("to_saelens needs model_name (to read its tokenizer's BOS) or prepend_bos=True/False")
    path = resolve(model_name)
    tok = from_hf_dir(path) if path.is_dir() else from_gguf(path)
    return tok.bos_id is not None


def from_saelens(path: str | Path, model=None) -> SAE:
    """An SAE from SAELens's on-disk format (`cfg.json` + `sae_weights.safetensors`), checked as `load` does."""
    path = Path(path)
    cfg = read_json(path / "cfg.json")
    weights_path = path / "sae_weights.safetensors"
    weights = read_safetensors(weights_path)
    arch_name = cfg.get("architecture", "standard")
    if arch_name not in _FROM_SAELENS:
        raise InputError(f"{path / 'cfg.json'}: SAELens architecture {arch_name!r} is not supported (known: {', '.join(_FROM_SAELENS)})")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise InputError(f"{path / 'cfg.json'}: SAELens SAE with normalize_activations={cfg['normalize_activations']!r}: fold the "
                         "normalisation into the weights first (sae.fold_activation_norm_scaling_factor)")
    arch = _FROM_SAELENS[arch_name]
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or ""
    try:
        site, layer = Hook.from_tl(hook) if hook else ("", None)
    except InputError as e:
        raise InputError(f"{path / 'cfg.json'}: {e}") from None
    arrays = {("b_enc" if k == "b_gate" and arch == "gated" else k): np.asarray(v, np.float32) for k, v in weights.items()}
    if arch == "batchtopk" and "threshold" not in arrays:
        arrays["threshold"] = np.asarray(arrays.pop("topk_threshold", -1.0), np.float32)
    k = cfg.get("k", 32)
    check_arrays(weights_path, arch, arrays, k=k, site=site, layer=layer, model=model, d_in=cfg.get("d_in"),
                 width=cfg.get("d_sae"))
    if "b_enc" not in arrays:
        raise InputError(f"{weights_path}: lacks {'b_gate' if arch == 'gated' else 'b_enc'}")
    if not cfg.get("apply_b_dec_to_input", True):
        # pre = x W_enc + b_enc: fold b_dec W_enc into b_enc (b_gate for Gated), ours subtracts b_dec first
        arrays["b_enc"] = arrays["b_enc"] + arrays["b_dec"] @ arrays["W_enc"]
    if cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens TopK: pre * |W_dec_i| before the top-k, f / |W_dec_i| before decoding; fold the norms in
        # (as SAELens's fold_W_dec_norm does) so unit-norm decoder rows give the same function
        n = np.linalg.norm(arrays["W_dec"], axis=-1)
        arrays.update(W_enc=arrays["W_enc"] * n[None, :], b_enc=arrays["b_enc"] * n, W_dec=arrays["W_dec"] / n[:, None])
    return sae_lib.from_arrays(arch, arrays, site=site, layer=layer, k=k)


# ----------------------------------------------------------------------------- Gemma Scope


def load_gemma_scope(path: str | Path, *, site: str = "resid_post", layer: int | None = None, model=None) -> SAE:
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
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: np.asarray(z[k], np.float32) for k in z.files}
        except FileNotFoundError:
            raise InputError(f"{path} is missing") from None
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise InputError(f"{path} is not a readable .npz file (truncated or corrupt?): {e}") from None
    elif path.suffix == ".safetensors":
        arrays = {k: np.asarray(v, np.float32) for k, v in read_safetensors(path).items()}
    else:
        raise InputError(f"{path}: expected a .npz or .safetensors file")
    missing = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"} - set(arrays)
    if missing:
        raise InputError(f"{path} lacks {sorted(missing)} (Gemma Scope files hold W_enc, b_enc, W_dec, b_dec, threshold)")
    check_arrays(path, "jumprelu", arrays, site=site, layer=layer, model=model)
    # Gemma Scope encodes x @ W_enc + b_enc (b_dec is not subtracted first); ours subtracts b_dec, so fold it in
    arrays["b_enc"] = arrays["b_enc"] + arrays["b_dec"] @ arrays["W_enc"]
    return sae_lib.from_arrays("jumprelu", arrays, site=site, layer=layer)
