"""Reading the files dictionaries come in, each failure an InputError naming the file: JSON objects,
safetensors, the flat `key: value` YAML of circuit-tracer configs, and file entries a config lists (kept
inside its directory). The bottom of `saes`' I/O: the format modules of `saes.io` (`formats` for SAEs, CLTs, SAELens and
Gemma Scope; `circuit_tracer` for circuit-tracer's files) all read through these."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.numpy import load_file

from models.errors import InputError

__all__ = ["MAX_YAML_BYTES", "contained_file", "read_json", "read_safetensors", "read_simple_yaml"]

MAX_YAML_BYTES = 1 << 20  # a config.yaml lists hooks and file names


def read_json(path: str | Path) -> dict:
    """The JSON object in `path` (InputError: missing, unreadable, not JSON, or not an object)."""
    try:
        out = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise InputError(f"{path} must hold a JSON object, got a {type(out).__name__}")
    return out


def read_safetensors(path: str | Path) -> dict:
    """`{name: numpy array}` of a safetensors file (InputError: missing, truncated or corrupt)."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise InputError(f"{path} is missing") from None
    except (OSError, SafetensorError) as e:
        raise InputError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def read_simple_yaml(path: Path) -> dict:
    """The `key: value` lines of a flat YAML file (values JSON or bare strings; `- item` lists)."""
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise InputError(f"{path} is {path.stat().st_size:,} bytes, more than a config's {MAX_YAML_BYTES:,}")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a readable UTF-8 config ({e})") from None
    out, key = {}, None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.lstrip().startswith("- ") and key is not None:
            out.setdefault(key, [])
            out[key].append(line.lstrip()[2:].strip().strip("'\""))
            continue
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not value:
            out[key] = []
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value.strip("'\"")
    return out


def contained_file(directory: str | Path, entry, where) -> Path:
    """`entry` (a file name a config lists, relative to `directory`) as a path inside `directory`: absolute paths,
    `..` and symlinks that lead out of it are refused (InputError naming `where` and the entry), so a copied or
    moved set reads its own files, never another directory's. The one exception is a Hugging Face cache
    snapshot (`.../snapshots/<rev>/`), whose files link into the repository's `blobs/`."""
    if not isinstance(entry, (str, Path)) or not str(entry) or "\x00" in str(entry):
        raise InputError(f"{where}: file entry {entry!r} is not a file name")
    rel = Path(entry)
    if rel.is_absolute() or ".." in rel.parts:
        raise InputError(f"{where}: file entry {str(entry)!r} is not inside {directory} (absolute paths and '..' are "
                         "refused; list files relative to the config's directory)")
    root = Path(directory).resolve()
    try:
        full = (root / rel).resolve(strict=False)
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise InputError(f"{where}: file entry {str(entry)!r} cannot be resolved ({e})") from None
    # a Hugging Face cache snapshot links its files into the repository's blobs/: the one place a link may lead
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    if not (full.is_relative_to(root) or (blobs is not None and full.parent == blobs)):
        raise InputError(f"{where}: file entry {str(entry)!r} resolves to {full}, outside {root} (a symlink out of "
                         "the directory?)")
    return full
