"""circuit-tracer's files, for cross-layer transcoders and per-layer transcoder sets: what its `load_clt` and
local transcoder-set loader read, and the same files written by circuit-tracer itself.

    circuit_tracer.write(tcs, "export/")              # layer_{i}.safetensors + config.yaml
    tcs = circuit_tracer.read_transcoders("export/")
    circuit_tracer.write(clt, "export_clt/")          # W_enc_{i} / W_dec_{i} safetensors + config.yaml
    clt = circuit_tracer.read_clt("export_clt/")

The dictionaries (`saes.core.cross_layer`, `saes.core.transcoders`) hold no file code; every read goes through
`saes.core.files` (each failure an InputError naming the file) and the arrays are checked by
`saes.core.sae.check_arrays` / `saes.core.cross_layer.from_arrays`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from models.errors import InputError
from models.sites import SITES
from saes.core import sae as sae_lib
from saes.core.cross_layer import CrossLayerTranscoder, from_arrays
from saes.core.files import contained_file, read_safetensors, read_simple_yaml
from saes.core.sae import check_arrays
from saes.core.transcoders import TranscoderSet

__all__ = ["read_clt", "read_transcoders", "write"]

# circuit-tracer's activation functions by our architecture: BatchTopK infers with a threshold (JumpReLU);
# TopK and Gated have no circuit-tracer loader
_CT_ARCHS = ("relu", "jumprelu", "batchtopk")
# circuit-tracer's hook names for our sites (its TransformerLens/nnsight mapping; with fold_ln=False
# TransformerLens's ln2.hook_normalized is before the norm weight, so the MLP input is mlp.hook_in)
_SET_HOOKS = {"ln2.normalized": "mlp.hook_in", "resid_mid": "hook_resid_mid", "mlp_out": "mlp.hook_out"}
_CLT_HOOKS = {"resid_mid": "hook_resid_mid", "ln2.normalized": "mlp.hook_in", "mlp_out": "hook_mlp_out"}


def write(d: CrossLayerTranscoder | TranscoderSet, path: str | Path, *, scan: str = "interp",
          dtype: str = "float32") -> Path:
    """Write a cross-layer transcoder or a transcoder set in circuit-tracer's format (below); `path`."""
    if isinstance(d, CrossLayerTranscoder):
        return _write_clt(d, path, scan=scan, dtype=dtype)
    if isinstance(d, TranscoderSet):
        return _write_set(d, path, scan=scan, dtype=dtype)
    raise InputError(f"circuit-tracer's files hold a cross-layer transcoder or a transcoder set, not a {type(d).__name__}")


def _write_clt(clt: CrossLayerTranscoder, path: str | Path, *, scan: str = "interp", dtype: str = "float32") -> Path:
    """Write circuit-tracer's CLT files (what its `load_clt` reads): per source layer i,
    `W_enc_{i}.safetensors` (`W_enc_{i} [W, D]`, `b_enc_{i}`, `b_dec_{i}`, JumpReLU `threshold_{i}`) and
    `W_dec_{i}.safetensors` (`W_dec_{i} [W, L - i, D]`), input scale folded in; and a `config.yaml` naming
    the hooks (`model_kind: cross_layer_transcoder`)."""
    if clt.arch not in ("relu", "jumprelu"):
        raise InputError(f"circuit-tracer's CLTs are ReLU or JumpReLU; a {clt.arch!r} CLT has no equivalent there")
    missing = [x for x in (clt.site, clt.target) if x not in _CLT_HOOKS]
    if missing:
        raise InputError(f"circuit-tracer has no hook for {missing}; its CLTs map resid_mid or ln2.normalized "
                         "to mlp_out")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    s = clt.fold_scale()
    np32 = lambda a: np.ascontiguousarray(np.asarray(a, dtype))  # noqa: E731
    for i in range(clt.n_layers):
        enc = {f"W_enc_{i}": np32(s.W_enc[i].T), f"b_enc_{i}": np32(s.b_enc[i]), f"b_dec_{i}": np32(s.b_dec[i])}
        if clt.arch == "jumprelu":
            enc[f"threshold_{i}"] = np32(s.threshold[i])
        save_file(enc, str(path / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": np32(s.W_dec[i, :, i:])}, str(path / f"W_dec_{i}.safetensors"))
    config = dict(model_kind="cross_layer_transcoder", scan=scan, feature_input_hook=_CLT_HOOKS[clt.site],
                  feature_output_hook=_CLT_HOOKS[clt.target])
    (path / "config.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()) + "\n")
    return path


def _write_set(tcs: TranscoderSet, path: str | Path, *, scan: str = "interp", dtype: str = "float32") -> Path:
    """Write the set as circuit-tracer reads a local transcoder set: `layer_{i}.safetensors` (`W_enc`
    [width, d_in], `W_dec` [width, d_out], `b_enc`, `b_dec`, JumpReLU `activation_function.threshold`) and
    `config.yaml` naming circuit-tracer's hooks (`mlp.hook_in` for ln2.normalized, `mlp.hook_out` for mlp_out),
    and a skip transcoder's `W_skip [d_out, d_in]`. The input scale is folded in; BatchTopK is written as the
    JumpReLU of its inference threshold."""
    if tcs.transcoders[0].arch not in _CT_ARCHS:
        raise InputError(f"circuit-tracer reads ReLU and JumpReLU transcoders; a {tcs.transcoders[0].arch!r} set "
                         f"has no equivalent there (architectures that export: {', '.join(_CT_ARCHS)})")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = []
    for t in tcs.transcoders:
        s = t.fold_scale()
        w = {"W_enc": s.W_enc.T, "W_dec": s.W_dec, "b_enc": s.enc_bias(), "b_dec": s.b_dec}
        if s.W_skip is not None:
            w["W_skip"] = s.W_skip.T  # circuit-tracer computes input @ W_skip.T
        if s.arch == "jumprelu":
            w["activation_function.threshold"] = s.threshold
        elif s.arch == "batchtopk":
            w["activation_function.threshold"] = jnp.full((s.width,), jnp.maximum(s.threshold, 0.0))
        name = f"layer_{t.layer}.safetensors"
        save_file({k: np.ascontiguousarray(np.asarray(v, dtype)) for k, v in w.items()}, str(path / name))
        files.append(name)  # relative to the set's directory: a copied or moved set reads its own files
    missing = [x for x in (tcs.site, tcs.target) if x not in _SET_HOOKS]
    if missing:
        raise InputError(f"circuit-tracer has no hook for {missing}; transcoders it reads map "
                         f"{' or '.join(k for k in _SET_HOOKS if k != 'mlp_out')} to mlp_out")
    config = dict(model_kind="transcoder_set", scan=scan, feature_input_hook=_SET_HOOKS[tcs.site],
                  feature_output_hook=_SET_HOOKS[tcs.target], transcoders=files)
    # YAML is a superset of JSON: one JSON object per line keeps this free of a YAML writer
    (path / "config.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()) + "\n")
    return path


def read_transcoders(path: str | Path) -> TranscoderSet:
    """Read a set written by `write` (or any local circuit-tracer ReLU/JumpReLU set whose
    config names hooks of `models.sites`: its TransformerLens names or circuit-tracer's MLP hooks)."""
    path = Path(path)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise InputError(f"{path} holds no circuit-tracer transcoder set (no config.yaml)")
    config = read_simple_yaml(config_path)
    by_tl = {**{s.tl: name for name, s in SITES.items()}, **{v: k for k, v in _SET_HOOKS.items()},
             "hook_mlp_out": "mlp_out"}
    hooks = {}
    for key in ("feature_input_hook", "feature_output_hook"):
        if key not in config:
            raise InputError(f"{config_path} has no {key} (a circuit-tracer transcoder set names both hooks)")
        if not isinstance(config[key], str) or config[key] not in by_tl:
            raise InputError(f"{config_path}: {key} {config[key]!r} is not a TransformerLens hook of models.sites")
        hooks[key] = by_tl[config[key]]
    site, target = hooks["feature_input_hook"], hooks["feature_output_hook"]
    listed = config.get("transcoders")
    if listed is not None and not (isinstance(listed, list) and listed):
        raise InputError(f"{config_path}: transcoders must be a non-empty list of files, got {listed!r}")
    if listed is None:
        listed = sorted((p.name for p in path.glob("layer_*.safetensors")), key=_layer_of)
        if not listed:
            raise InputError(f"{config_path} lists no transcoders and {path} holds no layer_*.safetensors")
        want = [f"layer_{i}.safetensors" for i in range(len(listed))]
        if listed != want:
            raise InputError(f"{path}: layer files {listed} are not layer_0 .. layer_{len(listed) - 1} "
                             f"(missing {sorted(set(want) - set(listed))})")
    tcs = []
    for layer, entry in enumerate(listed):
        f = contained_file(path, entry, f"{config_path}: transcoders[{layer}]")
        a = read_safetensors(f)
        if missing := sorted({"W_enc", "W_dec", "b_enc", "b_dec"} - set(a)):
            raise InputError(f"{f} lacks {missing} (has {sorted(a)})")
        arrays = dict(W_enc=a["W_enc"].T, W_dec=a["W_dec"], b_enc=a["b_enc"], b_dec=a["b_dec"])
        if "W_skip" in a:
            arrays["W_skip"] = a["W_skip"].T
        arch = "relu"
        if "activation_function.threshold" in a:
            arch, arrays["threshold"] = "jumprelu", a["activation_function.threshold"]
        check_arrays(f, arch, arrays)
        tcs.append(sae_lib.from_arrays(arch, arrays, site=site, layer=layer, target=target))
    return TranscoderSet.of(tcs)


def read_clt(path: str | Path, *, site: str | None = None, target: str | None = None) -> CrossLayerTranscoder:
    """A CLT from circuit-tracer's files (`W_enc_{i}` / `W_dec_{i}` safetensors, as `write` or
    circuit-tracer's `CrossLayerTranscoder.to_safetensors` write them). Hooks come from a `config.yaml` beside
    them, else `site`/`target`, else circuit-tracer's defaults (resid_mid -> mlp_out)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} is not a directory of circuit-tracer CLT files")
    present = {p.name for p in path.glob("W_*_*.safetensors")}
    layers = [int(m[1]) for name in present if (m := re.fullmatch(r"W_(?:enc|dec)_(\d{1,6})\.safetensors", name))]
    if "W_enc_0.safetensors" not in present:
        raise InputError(f"{path} holds no circuit-tracer CLT (no W_enc_0.safetensors)")
    n = max(layers) + 1  # every layer up to the highest file's needs both files
    want = {f"W_{kind}_{i}.safetensors" for kind in ("enc", "dec") for i in range(n)}
    if missing := sorted(want - present):
        raise InputError(f"{path}: a {n}-layer circuit-tracer CLT lacks {', '.join(missing)}")
    if extra := sorted(present - want):
        raise InputError(f"{path}: unexpected files {', '.join(extra)} beside W_enc_0 .. W_enc_{n - 1}")
    config = {}
    if (path / "config.yaml").exists():
        config = read_simple_yaml(path / "config.yaml")
        for key, given in (("feature_input_hook", site), ("feature_output_hook", target)):
            if given is None and key not in config:
                raise InputError(f"{path / 'config.yaml'} has no {key} (remove the file to use circuit-tracer's "
                                 "defaults, or pass site=/target=)")
    by_ct = {v: k for k, v in _CLT_HOOKS.items()} | {"mlp.hook_out": "mlp_out"}
    for key, given in (("feature_input_hook", site), ("feature_output_hook", target)):
        hook = config.get(key)
        if given is None and hook is not None and (not isinstance(hook, str) or hook not in by_ct):
            raise InputError(f"{path / 'config.yaml'}: {key} {hook!r} has no site of models.sites "
                             f"(known: {sorted(by_ct)})")
    site = site or by_ct[config.get("feature_input_hook", "hook_resid_mid")]
    target = target or by_ct[config.get("feature_output_hook", "hook_mlp_out")]
    parts = {name: [] for name in ("W_enc", "b_enc", "b_dec", "threshold", "W_dec")}
    for i in range(n):
        enc = read_safetensors(contained_file(path, f"W_enc_{i}.safetensors", path))
        dec = read_safetensors(contained_file(path, f"W_dec_{i}.safetensors", path))
        for name in (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"):
            if name not in enc:
                raise InputError(f"{path / f'W_enc_{i}.safetensors'} lacks {name} (has {sorted(enc)})")
        if f"W_dec_{i}" not in dec:
            raise InputError(f"{path / f'W_dec_{i}.safetensors'} lacks W_dec_{i} (has {sorted(dec)})")
        w = dec[f"W_dec_{i}"]
        if w.ndim != 3 or w.shape[1] != n - i:
            raise InputError(f"{path / f'W_dec_{i}.safetensors'}: W_dec_{i} has shape {w.shape}, expected "
                             f"[width, {n - i}, d_model] for a {n}-layer CLT")
        parts["W_enc"].append(enc[f"W_enc_{i}"].T)
        parts["b_enc"].append(enc[f"b_enc_{i}"])
        parts["b_dec"].append(enc[f"b_dec_{i}"])
        parts["threshold"].append(enc.get(f"threshold_{i}"))
        parts["W_dec"].append(np.concatenate([np.zeros((w.shape[0], i, w.shape[2]), w.dtype), w], 1))
    arch = "jumprelu" if all(t is not None for t in parts["threshold"]) else "relu"
    if arch == "relu" and any(t is not None for t in parts["threshold"]):
        raise InputError(f"{path}: some layers have a threshold_{{i}} and some do not")
    try:
        arrays = {name: np.stack([np.asarray(a, np.float32) for a in parts[name]]) for name in parts
                  if name != "threshold" or arch == "jumprelu"}
    except ValueError as e:
        raise InputError(f"{path}: the layers' arrays differ in shape ({e})") from None
    return from_arrays(path, dict(arch=arch, site=site, target=target), arrays)


def _layer_of(name: str) -> int:
    """The layer of `layer_{i}.safetensors` (names that are not so sort last)."""
    stem = name.removesuffix(".safetensors").removeprefix("layer_")
    return int(stem) if stem.isdigit() else 1 << 30
