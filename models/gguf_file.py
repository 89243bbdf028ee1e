"""Reading GGUF files: metadata as plain Python values and tensors dequantised to float32 numpy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ModelFileError


def open_gguf(path: str | Path):
    """Open a GGUF file with the `gguf` package, turning a bad file into a `ModelFileError`."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct.error/IndexError on bad bytes
        raise ModelFileError(f"{path} is not a readable GGUF file (corrupt or truncated?): {type(e).__name__}: {e}") from e


def read_metadata(reader) -> dict[str, Any]:
    """All key/value fields as Python values (str, int, float, bool or lists of them)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def read_tensors(reader) -> dict[str, np.ndarray]:
    """Every tensor dequantised to float32, shaped like the Hugging Face weight (`[out, in]` for matrices)."""
    import gguf

    out = {}
    for t in reader.tensors:
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ModelFileError(f"tensor {t.name}: quantisation {t.tensor_type.name} is not supported by gguf's dequantiser") from e
        expected = tuple(int(d) for d in reversed(t.shape))
        if arr.size != int(np.prod(expected)):
            raise ModelFileError(f"tensor {t.name}: {arr.size} values, expected shape {expected} (truncated file?)")
        out[t.name] = np.asarray(arr, dtype=np.float32).reshape(expected)
    return out
