"""Reading GGUF files: metadata as plain Python values, tensor shapes, and one tensor at a time dequantised to
float32 numpy (the file stays memory-mapped; nothing is read until asked for)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ModelFileError


def open_gguf(path: str | Path):
    """Open a GGUF file with the `gguf` package (read-only, memory-mapped), turning a bad file into a
    `ModelFileError`. The reader is kept per process and file version: parsing the fields of a 262k-token
    vocabulary (Gemma 3) takes about 30 s in `gguf`'s Python reader."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"GGUF file not found: {path}")
    st = path.stat()
    return _reader(path.resolve(), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _reader(path: Path, mtime_ns: int, size: int):
    import gguf

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


def tensor_shapes(reader) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape as the Hugging Face weight has it (`[out, in]` for matrices), without reading data."""
    return {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}


def dequantize(t, rows: slice | None = None) -> np.ndarray:
    """One tensor of `reader.tensors` (or the rows `rows` of its leading axis) dequantised to float32, shaped
    like `tensor_shapes`. Quantisation blocks run along the last axis, so a row range reads only its blocks."""
    import gguf

    shape = tuple(int(d) for d in reversed(t.shape))
    data = t.data if rows is None else t.data[rows]
    if rows is not None:
        shape = (len(range(*rows.indices(shape[0]))), *shape[1:])
    try:
        arr = gguf.quants.dequantize(data, t.tensor_type)
    except NotImplementedError as e:
        raise ModelFileError(f"tensor {t.name}: quantisation {t.tensor_type.name} is not supported by gguf's dequantiser") from e
    if arr.size != int(np.prod(shape)):
        raise ModelFileError(f"tensor {t.name}: {arr.size} values, expected shape {shape} (truncated file?)")
    return np.asarray(arr, dtype=np.float32).reshape(shape)
