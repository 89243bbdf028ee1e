"""Reading GGUF files: metadata as plain Python values, tensor shapes, and one tensor at a time dequantised to
float32 numpy (the file stays memory-mapped; nothing is read until asked for)."""

from __future__ import annotations

import functools
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ModelFileError

# Limits on the metadata section, checked before `gguf`'s reader allocates anything: the largest real vocabularies
# (Gemma 3's 262k tokens with scores and types, Llama 3's 128k tokens and 280k merges) stay well below them.
MAX_METADATA_ITEMS = 1 << 20  # values, array elements and nested arrays over all keys (gguf parses ~25k/s)
MAX_METADATA_BYTES = 1 << 28  # the key/value section
MAX_ARRAY_DEPTH = 3  # arrays of arrays
MAX_TENSOR_DIMS = 4  # GGML_MAX_DIMS
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


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

    check_header(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct.error/IndexError on bad bytes
        raise ModelFileError(f"{path} is not a readable GGUF file (corrupt or truncated?): {type(e).__name__}: {e}") from e


def check_header(path: str | Path) -> None:
    """Walk a GGUF file's header (metadata keys and values, tensor infos) without allocating: every declared count
    and length is checked against the bytes left in the file, and the metadata against `MAX_METADATA_ITEMS`,
    `MAX_METADATA_BYTES` and `MAX_ARRAY_DEPTH`, so a few bytes that declare 2**40 elements fail at once
    (`ModelFileError` naming the file, the key and the count) instead of exhausting memory in `gguf`'s reader."""
    path = Path(path)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _walk_header(path, buf)
    except ValueError as e:  # mmap of an empty file
        raise ModelFileError(f"{path} is not a readable GGUF file (empty?): {e}") from None
    except OSError as e:
        raise ModelFileError(f"{path} is not a readable GGUF file: {e}") from None


def _walk_header(path: Path, buf) -> None:
    size = len(buf)
    bad = lambda what: ModelFileError(f"{path} is not a readable GGUF file (corrupt or truncated?): {what}")  # noqa: E731
    if size < 24 or buf[:4] != b"GGUF":
        raise bad("no GGUF magic and header")
    order = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"
    version, n_tensors, n_kv = struct.unpack_from(order + "IQQ", buf, 4)
    if version not in (2, 3):
        raise ModelFileError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    off, items = 24, 0

    def take(n: int, what: str) -> int:
        nonlocal off
        if n < 0 or n > size - off:
            raise bad(f"{what} declares {n:,} bytes at offset {off:,} but {size - off:,} remain")
        off += n
        return off - n

    def u(fmt: str, what: str) -> int:
        return struct.unpack_from(order + fmt, buf, take(struct.calcsize(fmt), what))[0]

    def string(what: str) -> None:
        take(u("Q", what + " length"), what)

    def value(vtype: int, key: str, depth: int) -> None:
        nonlocal items
        items += 1
        if items > MAX_METADATA_ITEMS:
            raise ModelFileError(f"{path}: metadata key {key!r} takes the metadata past MAX_METADATA_ITEMS="
                                 f"{MAX_METADATA_ITEMS:,} values (a corrupt or hostile file?)")
        if vtype in _SCALAR_SIZES:
            take(_SCALAR_SIZES[vtype], f"metadata key {key!r}")
        elif vtype == _STRING:
            string(f"metadata key {key!r}")
        elif vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise ModelFileError(f"{path}: metadata key {key!r} nests arrays deeper than {MAX_ARRAY_DEPTH}")
            itype, count = u("I", f"metadata key {key!r}"), u("Q", f"metadata key {key!r}")
            minimum = _SCALAR_SIZES.get(itype, 8 if itype == _STRING else 12 if itype == _ARRAY else 0)
            if minimum == 0:
                raise ModelFileError(f"{path}: metadata key {key!r} is an array of unknown type {itype}")
            if count * minimum > size - off:
                raise bad(f"metadata key {key!r} declares an array of {count:,} elements (at least "
                          f"{count * minimum:,} bytes) but {size - off:,} bytes remain")
            if items + count > MAX_METADATA_ITEMS:
                raise ModelFileError(f"{path}: metadata key {key!r} declares {count:,} elements, past "
                                     f"MAX_METADATA_ITEMS={MAX_METADATA_ITEMS:,} values (a corrupt or hostile file?)")
            if itype in _SCALAR_SIZES:
                take(count * minimum, f"metadata key {key!r}")
                items += count
            else:
                for _ in range(count):
                    value(itype, key, depth + 1)
        else:
            raise ModelFileError(f"{path}: metadata key {key!r} has unknown value type {vtype}")

    if n_kv * 13 > size - off:  # a key/value takes at least 8 (key length) + 4 (type) + 1 bytes
        raise bad(f"the header declares {n_kv:,} metadata keys but {size - off:,} bytes remain")
    for i in range(n_kv):
        klen = u("Q", f"metadata key #{i} length")
        key = bytes(buf[take(klen, f"metadata key #{i}"):off]).decode("utf-8", "replace")
        value(u("I", f"metadata key {key!r}"), key, 0)
        if off - 24 > MAX_METADATA_BYTES:
            raise ModelFileError(f"{path}: metadata past key {key!r} exceeds MAX_METADATA_BYTES={MAX_METADATA_BYTES:,}")
    if n_tensors * 24 > size - off:  # name length 8, n_dims 4, type 4, offset 8
        raise bad(f"the header declares {n_tensors:,} tensors but {size - off:,} bytes remain")
    for i in range(n_tensors):
        string(f"tensor #{i} name")
        n_dims = u("I", f"tensor #{i} n_dims")
        if n_dims > MAX_TENSOR_DIMS:
            raise bad(f"tensor #{i} declares {n_dims} dimensions (at most {MAX_TENSOR_DIMS})")
        take(8 * n_dims + 12, f"tensor #{i} info")


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
