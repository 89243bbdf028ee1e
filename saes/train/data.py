"""Activation sources for SAE training: text -> tokens -> a partial forward -> fixed-size chunks of activations.

    docs = default_corpus()                                   # English docstrings of Python + installed packages
    rows = TokenRows(default_corpus, m.tokenizer, context=128)  # packed [BOS] + 127-token rows, deterministic
    src = ModelSource(m, [("resid_post", 10), ("resid_post", 15)], rows, chunk_tokens=2**16)
    for chunk, next_position in src.chunks(position=0):     # {hook: [chunk_tokens, d_in]} on device
        ...

A *source* yields chunks: dicts `{hook name: float32 array [N, d_in]}` of N activations each (BOS, pad and
other excluded positions removed), together with the position to resume from after that chunk. The trainer
shuffles each chunk on device (a permutation drawn from the run's seed and the chunk index) and cuts it into
batches, so the whole data stream is a deterministic function of (source, position, seed): that is what
makes resumed runs bit-identical. Sources:

- `ModelSource`: live model activations at several (site, layer) hooks from ONE forward pass per model
  batch, stopped after the deepest requested layer (`stop_at_layer`).
- `CachedSource`: chunks written to disk by `cache_activations` (one `.npy` per hook per chunk, memory-mapped).
- `ArraySource`: chunks produced by a function of the chunk index (synthetic data, tests).

The default corpus (`default_corpus`) is the English prose that every installation of this project already
has on disk: the docstrings of Python's standard library, the language reference topics that `pydoc`
ships (`pydoc_data.topics`), and the docstrings of the installed scientific packages this project depends
on (numpy, scipy, jax, flax, optax, orbax, equinox, matplotlib; with the test extra also torch,
transformers, sympy, scikit-learn). It needs no hub and no extra package, is permissively licensed (PSF,
BSD, Apache), and holds several million tokens of human-written technical English (`corpus_stats()`).
Docstrings are extracted with `ast` (no package is imported), de-duplicated, and visited in a fixed
shuffled order of files, so the stream is reproducible on a given installation. Any user corpus works too:
`iter_documents(path)` reads .txt/.md files, .jsonl (`text` field), .parquet and Hugging Face datasets saved
with `save_to_disk` (both through pyarrow); `mix_corpora` interleaves several corpora by character share.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import json
import math
import numbers
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import models
from models import Capture
from models.errors import InputError
from models.sites import SITES, Hook, check_site
from saes.core.dictionary import site_width
from saes.core.sae import hook_name

__all__ = [
    "ArraySource", "CachedSource", "DEFAULT_PACKAGES", "ModelSource", "TokenRows", "cache_activations",
    "corpus_stats", "default_corpus", "hook_dir", "iter_documents", "mix_corpora", "parse_hook", "parse_hooks",
    "site_width",
]

DEFAULT_PACKAGES = ("numpy", "scipy", "jax", "flax", "optax", "orbax", "equinox", "matplotlib", "torch",
                    "transformers", "sympy", "sklearn")
_SKIP_DIRS = {"test", "tests", "testing", "idlelib", "lib2to3", "__pycache__", "site-packages", "dist-packages",
              "_vendor", "vendored", "third_party", "_private"}
MIN_DOC_CHARS = 200


# ----------------------------------------------------------------------------- the default corpus


def _package_dirs(packages: Sequence[str]) -> list[tuple[str, Path]]:
    """(name, directory) of each installed package among `packages`, found without importing it."""
    out = []
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        for loc in spec.submodule_search_locations:
            out.append((name, Path(loc)))
    return out


def _python_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test_"))
    return files


def corpus_files(packages: Sequence[str] = DEFAULT_PACKAGES) -> list[Path]:
    """Every `.py` file whose docstrings make the default corpus: the standard library's, then `packages`'."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = _python_files(stdlib)
    for _, d in _package_dirs(packages):
        files.extend(_python_files(d))
    return files


def _docstrings(path: Path) -> tuple[str, ...]:
    """The docstrings (at least `MIN_DOC_CHARS`) of one source file, parsed once per process and file version
    (a pass over the whole corpus parses 9k files in about 90 s; it holds about 35 MB of text)."""
    try:
        st = path.stat()
    except OSError:
        return ()
    return _parsed_docstrings(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=None)
def _parsed_docstrings(path: Path, mtime_ns: int, size: int) -> tuple[str, ...]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError, UnicodeDecodeError, MemoryError, RecursionError):
        return ()
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOC_CHARS:
                docs.append(doc)
    return tuple(docs)


def default_corpus(seed: int = 0, packages: Sequence[str] = DEFAULT_PACKAGES) -> Iterator[str]:
    """Documents of the default corpus (see the module docstring): `pydoc`'s language-reference topics, then
    the de-duplicated docstrings of the standard library and `packages`, files visited in an order shuffled
    by `seed`. Finite (`corpus_stats()` counts it); `TokenRows` cycles through it with a new order per epoch."""
    seen: set[bytes] = set()

    def fresh(doc: str) -> bool:
        h = hashlib.blake2b(doc.encode("utf-8", "replace"), digest_size=12).digest()
        if h in seen:
            return False
        seen.add(h)
        return True

    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - some distributions strip it
        topics = {}
    files = corpus_files(packages)
    order = np.random.default_rng(seed).permutation(len(files) + 1)
    for i in order:
        if i == len(files):  # the pydoc topics, as one "file" among the others
            for name in sorted(topics):
                if len(topics[name]) >= MIN_DOC_CHARS and fresh(topics[name]):
                    yield topics[name]
            continue
        for doc in _docstrings(files[i]):
            if fresh(doc):
                yield doc


def corpus_stats(tokenizer=None, packages: Sequence[str] = DEFAULT_PACKAGES, limit_docs: int | None = None) -> dict:
    """Documents, characters and (with a tokenizer) tokens of the default corpus on this installation."""
    docs = chars = tokens = 0
    batch: list[str] = []
    for doc in default_corpus(0, packages):
        docs += 1
        chars += len(doc)
        if tokenizer is not None:
            batch.append(doc)
            if len(batch) == 512:
                tokens += sum(len(e.ids) for e in tokenizer.backend.encode_batch(batch, add_special_tokens=False))
                batch = []
        if limit_docs and docs >= limit_docs:
            break
    if batch:
        tokens += sum(len(e.ids) for e in tokenizer.backend.encode_batch(batch, add_special_tokens=False))
    return dict(documents=docs, characters=chars, tokens=tokens if tokenizer is not None else None,
                packages=[n for n, _ in _package_dirs(packages)])


# ----------------------------------------------------------------------------- user corpora


def iter_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a user corpus: a `.txt`/`.md` file (one document), a `.jsonl` file (`text_field` of each
    line), a `.parquet` file or a Hugging Face dataset directory saved with `save_to_disk` (column
    `text_field`), or a directory of any of these (files in sorted order)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"corpus path {path} does not exist")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            yield from _arrow_dataset(path, text_field)
            return
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".jsonl", ".parquet"))
        if not files:
            raise InputError(f"no .txt, .md, .jsonl or .parquet files under {path}")
        for f in files:
            yield from iter_documents(f, text_field)
        return
    if path.suffix in (".txt", ".md"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if "\x00" in text:
            raise InputError(f"{path} holds NUL bytes: a binary file, not text; remove it from the corpus")
        yield text
    elif path.suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field)
    elif path.suffix == ".parquet":
        pq = _pyarrow("parquet")
        names = pq.read_schema(path).names
        _check_column(path, names, text_field)
        yield from _column_texts(path, pq.read_table(path, columns=[text_field]).column(text_field), text_field)
    else:
        raise InputError(f"unsupported corpus file {path} (use .txt, .md, .jsonl, .parquet or a saved HF dataset)")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    """`text_field` of each line of a .jsonl file; an InputError names the file, the line and the fix."""
    hint = "choose the field with --text-field (TrainConfig.text_field)"
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}, line {n}: not UTF-8 text ({e.reason} at byte {e.start} of the line); a "
                                 ".jsonl corpus holds one JSON object per line in UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                cut = "; the file ends inside this line: it was cut off (re-export it or drop the last line)" \
                    if not raw.endswith(b"\n") else "; fix or remove the line"
                raise InputError(f"{path}, line {n}: invalid JSON ({e.msg} at column {e.colno}){cut}") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = sorted(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"
                raise InputError(f"{path}, line {n}: no field {text_field!r} (has: {fields}); {hint}")
            text = record[text_field]
            if not isinstance(text, str):
                raise InputError(f"{path}, line {n}: field {text_field!r} is a {type(text).__name__}, not a string; "
                                 f"{hint}")
            yield text


def _check_column(path: Path, names: Sequence[str], text_field: str):
    if text_field not in names:
        raise InputError(f"{path} has no column {text_field!r} (has: {list(names)}); choose the column with "
                         "--text-field (TrainConfig.text_field)")


def _column_texts(path: Path, column, text_field: str) -> Iterator[str]:
    """The non-empty strings of an arrow column; a column of another type is an InputError naming it."""
    import pyarrow as pa

    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise InputError(f"{path}: column {text_field!r} holds {column.type}, not strings; choose the text column "
                         "with --text-field (TrainConfig.text_field)")
    yield from (t for t in column.to_pylist() if t)


def _pyarrow(module: str):
    try:
        return importlib.import_module(f"pyarrow.{module}") if module else importlib.import_module("pyarrow")
    except ImportError as e:
        raise InputError("reading parquet files or saved Hugging Face datasets needs `pip install pyarrow`") from e


def _arrow_dataset(path: Path, text_field: str) -> Iterator[str]:
    pa = _pyarrow("")
    files = sorted(path.rglob("*.arrow"))
    if not files:
        raise InputError(f"no .arrow files in the saved dataset {path}")
    for f in files:
        with pa.memory_map(str(f)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
            table = reader.read_all()
        _check_column(f, table.column_names, text_field)
        yield from _column_texts(f, table.column(text_field), text_field)


def mix_corpora(corpora: Sequence[Callable[[], Iterable[str]] | Iterable[str]], weights: Sequence[float],
                seed: int = 0) -> Iterator[str]:
    """Documents of several corpora (each a document iterable or a no-argument function returning one),
    interleaved so that each corpus' share of the *characters* yielded tracks its weight (normalised): each
    document comes from a corpus not ahead of its share, drawn with probability proportional to its weight
    by a generator seeded with `seed` (so the stream is deterministic). No corpus gets more than one document
    beyond its share; with two corpora neither falls more than one document behind. The mix ends as soon as
    the corpus drawn has no document left (a weight-0 corpus is never read). Arguments are checked on the call
    (InputError naming the one at fault); for `TokenRows`/`saes.fit(docs=...)` pass
    `lambda seed=0: mix_corpora(corpora, weights, seed)`."""
    corpora = list(corpora)
    weights = list(weights)
    if not corpora:
        raise InputError("mix_corpora: corpora is empty; give at least one corpus")
    if len(weights) != len(corpora):
        raise InputError(f"mix_corpora: weights has {len(weights)} entries for {len(corpora)} corpora; give one "
                         "weight per corpus")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not (math.isfinite(w) and w >= 0):
            raise InputError(f"mix_corpora: weights[{i}]={w!r} must be a finite number >= 0")
    if sum(weights) == 0:
        raise InputError("mix_corpora: weights are all zero; give at least one corpus a positive weight")
    share = np.asarray(weights, np.float64) / sum(weights)
    its = [iter(c() if callable(c) else c) for c in corpora]
    return _mixed(its, share, np.random.default_rng(seed))


def _mixed(its: list[Iterator[str]], share: np.ndarray, rng: np.random.Generator) -> Iterator[str]:
    chars = np.zeros(len(its), np.float64)
    while True:
        deficit = np.where(share > 0, share * chars.sum() - chars, -np.inf)  # sums to 0 over the weighted ones
        behind = np.where(deficit >= min(deficit.max(), 0.0), share, 0.0)  # (max: when rounding leaves none >= 0)
        i = int(rng.choice(len(its), p=behind / behind.sum()))
        doc = next(its[i], None)
        if doc is None:
            return
        chars[i] += len(doc)
        yield doc


# ----------------------------------------------------------------------------- tokens


PIECE_CHARS = 1 << 20  # a longer document is tokenized in pieces of about this many characters
BATCH_CHARS = 1 << 23  # characters per tokenizer call


def _pieces(docs: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """`(piece, is the document's last piece)` of each document: the document itself when it has at most
    `PIECE_CHARS` characters, else pieces of at most that many cut just before a space or after a newline that a
    non-space follows (where word-splitting pre-tokenizers split anyway), or hard when a window has neither."""
    for doc in docs:
        start, n = 0, len(doc)
        while n - start > PIECE_CHARS:
            lo, hi = start + PIECE_CHARS // 2, start + PIECE_CHARS
            cut = doc.rfind(" ", lo, hi)
            if cut <= lo:
                nl = doc.rfind("\n", lo, hi - 1)
                cut = nl + 1 if nl >= lo and not doc[nl + 1].isspace() else hi
            yield doc[start:cut], False
            start = cut
        yield doc[start:], True


class TokenRows:
    """Packed token rows `[BOS] + context-1 tokens` from a document stream, deterministic and restartable.

    Documents are tokenized in batches, joined with `separator` (plain text, so no special token appears
    inside a row) and cut into rows; every row starts with BOS (excluded from training by the sources).
    `split="train"` skips every `eval_every`-th document, `split="eval"` keeps only those (a held-out set
    for CE-loss evaluation). The stream cycles over the corpus (a new document order each epoch when the
    document function takes a seed)."""

    def __init__(self, documents: Callable[..., Iterable[str]], tokenizer, context: int = 128, *,
                 separator: str = "\n\n", split: str = "train", eval_every: int = 50, seed: int = 0):
        if context < 2:
            raise InputError("context must be at least 2 (BOS + one token)")
        if split not in ("train", "eval", "all"):
            raise InputError(f"split must be 'train', 'eval' or 'all', got {split!r}")
        self.documents, self.tokenizer, self.context = documents, tokenizer, int(context)
        self.separator, self.split, self.eval_every, self.seed = separator, split, eval_every, seed
        self.bos_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id

    def _docs(self, epoch: int) -> Iterator[str]:
        try:
            docs = self.documents(self.seed + epoch)
        except TypeError:
            docs = self.documents()
        for i, d in enumerate(docs):
            held_out = i % self.eval_every == self.eval_every - 1
            if self.split == "all" or (self.split == "eval") == held_out:
                yield d

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.rows(0)

    def _token_batches(self, epoch: int, sep: list[int]) -> Iterator[list[int]]:
        """The epoch's documents tokenized a batch at a time (8 documents per tokenizer call, doubling to 256:
        the first rows need few; at most `BATCH_CHARS` characters per call), each document followed by the
        separator's ids. A document longer than `PIECE_CHARS` is tokenized in pieces cut at whitespace, so memory
        is bounded by the piece, not the document (a 32 MB one-line file took 10.5 GB whole)."""
        pieces, size = _pieces(self._docs(epoch)), 8
        while True:
            batch, ends, chars = [], [], 0
            for text, last in pieces:
                batch.append(text)
                ends.append(last)
                chars += len(text)
                if len(batch) >= size or chars >= BATCH_CHARS:
                    break
            if not batch:
                return
            yield [t for enc, last in zip(self.tokenizer.backend.encode_batch(batch, add_special_tokens=False), ends)
                   for t in (*enc.ids, *(sep if last else ()))]
            size = min(2 * size, 256)

    def rows(self, start: int = 0) -> Iterator[np.ndarray]:
        """int32 rows `[context]`, from the `start`-th on (earlier rows are re-tokenized, not run)."""
        n, buf, epoch, width = 0, [], 0, self.context - 1
        sep = self.tokenizer.backend.encode(self.separator, add_special_tokens=False).ids
        while True:
            produced = False
            for ids in self._token_batches(epoch, sep):
                buf.extend(ids)
                while len(buf) >= width:
                    if n >= start:
                        yield np.asarray([self.bos_id, *buf[:width]], np.int32)
                    produced = True
                    n += 1
                    del buf[:width]
            if not produced and epoch > 0:
                raise InputError("the corpus is too small to fill a single row")
            epoch += 1

    def take(self, n: int, start: int = 0) -> np.ndarray:
        """The rows `[start, start + n)` as an int32 array `[n, context]`."""
        it = self.rows(start)
        return np.stack([next(it) for _ in range(n)])


def parse_hooks(sites: Sequence[str] | str, layers: Sequence[int] | None) -> list[Hook]:
    """Every site at every layer, as `models.Hook`s (model-level sites like `embed` take no layer)."""
    sites = [sites] if isinstance(sites, str) else list(sites)
    out = []
    for s in sites:
        if not check_site(s).per_layer:
            out.append(Hook(s))
            continue
        if not layers:
            raise InputError(f"site {s!r} is per layer: give --layers")
        out.extend(Hook(s, int(layer)) for layer in layers)
    return out


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_hook(name: str) -> Hook | tuple[str, None]:
    """The typed identity of a stream name: `"L10.resid_post"` -> `Hook("resid_post", 10)`, a model site
    (`"embed"`) -> `Hook("embed")` (`models.Hook.parse`; a layer site needs its layer). Sources not made from a
    model (synthetic data) may name their one stream with a plain identifier (`"synthetic"` ->
    `("synthetic", None)`). Anything else, in particular a name with path separators or `..`, is an InputError:
    stream names come from files (a cache's manifest) and become directory names only through `hook_dir`."""
    if isinstance(name, str) and _IDENTIFIER.fullmatch(name) and name not in SITES:
        return name, None
    if not isinstance(name, str) or (name in SITES and SITES[name].per_layer):  # a layer site needs its layer
        raise InputError(f"invalid hook name {name!r}: expected 'L<layer>.<site>' for a per-layer site of "
                         f"models.sites, a model-level site, or a plain identifier for non-model data")
    return Hook.parse(name)


def hook_dir(root: str | Path, name: str) -> Path:
    """`root / name` for a hook name, built from its parsed identity; never leaves `root`."""
    site, layer = parse_hook(name)
    root = Path(root)
    path = root / hook_name(site, layer)
    if not path.resolve().is_relative_to(root.resolve()):  # a symlink inside root may still point elsewhere
        raise InputError(f"{path} leads outside {root} (a symlink?); hook files stay under their root")
    return path


# ----------------------------------------------------------------------------- sources


@dataclass
class ArraySource:
    """Chunks from `make(index) -> {hook: array [chunk_tokens, d_in]}` (synthetic data, tests). Position =
    chunk index."""

    make: Callable[[int], dict]
    hooks: tuple[str, ...]
    d_in: dict
    meta: dict | None = None

    def chunks(self, position: int = 0) -> Iterator[tuple[dict, int]]:
        i = position
        while True:
            yield {h: jnp.asarray(v, jnp.float32) for h, v in self.make(i).items()}, i + 1
            i += 1


def _write_fn(hooks_spec):
    """A jitted writer: put the valid rows of one model batch into each hook's buffer at `offset`."""

    @partial_jit_donate
    def write(buffers, acts, order, offset):
        out = {}
        for hook, (site, li) in hooks_spec.items():
            a = acts[site] if li is None else acts[site][li]
            a = a.reshape(-1, buffers[hook].shape[1]).astype(buffers[hook].dtype)
            out[hook] = jax.lax.dynamic_update_slice(buffers[hook], jnp.take(a, order, axis=0), (offset, 0))
        return out

    return write


def partial_jit_donate(f):
    """`jax.jit(f)` donating its first argument (the shuffle buffer is updated in place)."""
    return jax.jit(f, donate_argnums=(0,))


class ModelSource:
    """Activations of `model` at `hooks` ((site, layer) pairs) on `rows` (a `TokenRows` or anything with
    `.rows(start)`), all hooks from one forward pass per `model_batch` rows that stops after the deepest
    requested layer. Chunks hold `chunk_tokens` activations; excluded positions (BOS, pad, `exclude_ids`,
    mask 0) are dropped on device with fixed shapes (valid rows are moved first and written at a running
    offset). Position = rows consumed."""

    def __init__(self, model, hooks: Sequence[tuple[str, int | None]], rows, *, chunk_tokens: int = 2**16,
                 model_batch: int = 16, exclude_ids: Sequence[int] | None = None, dtype=jnp.float32):
        self.model, self.rows, self.chunk_tokens, self.model_batch = model, rows, int(chunk_tokens), int(model_batch)
        self.dtype = dtype
        cfg = model.cfg
        sites: dict[str, list[int]] = {}
        for site, layer in hooks:
            if layer is not None and not 0 <= layer < cfg.n_layers:
                raise InputError(f"layer {layer} out of range for a {cfg.n_layers}-layer model")
            sites.setdefault(site, [])
            if layer is not None and layer not in sites[site]:
                sites[site].append(layer)
        self.captures = tuple(Capture(s, layers=tuple(ls) if ls else None) for s, ls in sites.items())
        self.spec = {hook_name(s, l): (s, None if l is None else sites[s].index(l)) for s, l in hooks}
        self.hooks = tuple(self.spec)
        needs_final = any(s == "final_norm" for s, _ in hooks)
        deepest = max((l for _, l in hooks if l is not None), default=-1)
        self.stop_at_layer = None if needs_final or deepest + 1 >= cfg.n_layers else deepest + 1
        tok = model.tokenizer
        ex = set(exclude_ids or ())
        if tok is not None:
            ex |= {i for i in (tok.bos_id, tok.pad_id) if i is not None}
        self.exclude_ids = np.asarray(sorted(ex), np.int32)
        self.meta = dict(model=model.name, hooks=[list(h) for h in hooks], context=getattr(rows, "context", None),
                         stop_at_layer=self.stop_at_layer)
        self._write = _write_fn(self.spec)
        self.d_in = self._probe_dims()

    def _probe_dims(self) -> dict[str, int]:
        return {hook: site_width(self.model.cfg, site) for hook, (site, _) in self.spec.items()}

    def forward(self, tokens, mask):
        """{site: activations} of one model batch (stopped after the deepest hook)."""
        _, acts = models.forward(self.model, jnp.asarray(tokens), attention_mask=jnp.asarray(mask),
                                 capture=self.captures, stop_at_layer=self.stop_at_layer)
        return acts

    def valid(self, tokens, mask) -> np.ndarray:
        return (np.asarray(mask) > 0) & ~np.isin(tokens, self.exclude_ids)

    def chunks(self, position: int = 0) -> Iterator[tuple[dict, int]]:
        it = self.rows.rows(position)
        pos = position
        B = self.model_batch
        while True:
            T = None
            buffers = None
            offset = 0
            while offset < self.chunk_tokens:
                rows = [next(it) for _ in range(B)]
                pos += B
                tokens = np.stack(rows).astype(np.int32)
                mask = np.ones_like(tokens)
                if buffers is None:
                    T = tokens.shape[1]
                    buffers = {h: jnp.zeros((self.chunk_tokens + B * T, d), self.dtype) for h, d in self.d_in.items()}
                valid = self.valid(tokens, mask).reshape(-1)
                order = np.argsort(~valid, kind="stable").astype(np.int32)
                acts = self.forward(tokens, mask)
                buffers = self._write(buffers, acts, jnp.asarray(order), jnp.asarray(offset, jnp.int32))
                offset += int(valid.sum())
            yield {h: b[: self.chunk_tokens] for h, b in buffers.items()}, pos


class CachedSource:
    """Chunks written by `cache_activations` (memory-mapped `.npy` per hook per chunk). Position = chunk
    index; after the last chunk it starts again from the first."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        manifest = self.dir / "manifest.json"
        if not manifest.exists():
            raise InputError(f"{self.dir} is not an activation cache (no manifest.json)")
        try:
            self.manifest = m = json.loads(manifest.read_text(encoding="utf-8"))
            hooks, d_in = list(m["hooks"]), dict(m["d_in"])
            self.n_chunks, self.chunk_tokens = int(m["chunks"]), int(m["chunk_tokens"])
            self.d_in = {h: int(d_in[h]) for h in hooks}
            self.meta = dict(m.get("meta") or {})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise InputError(f"{manifest} is not a valid cache manifest ({type(e).__name__}: {e}); expected hooks, "
                             "d_in, chunks, chunk_tokens as written by saes.cache_activations") from None
        self.dirs = {h: hook_dir(self.dir, h) for h in hooks}  # hook names from the file, parsed, never raw paths
        self.hooks = tuple(hooks)
        if not hooks or self.n_chunks < 1 or self.chunk_tokens < 1 or min(self.d_in.values()) < 1:
            raise InputError(f"{manifest}: needs at least one hook, chunk, token and dimension, got hooks={hooks}, "
                             f"chunks={self.n_chunks}, chunk_tokens={self.chunk_tokens}, d_in={self.d_in}")

    def load(self, index: int) -> dict:
        i = index % self.n_chunks
        out = {}
        for h, d in self.dirs.items():
            f = d / f"{i:06d}.npy"
            try:
                a = np.load(f, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise InputError(f"cannot read cache chunk {f}: {e}") from None
            if a.shape != (self.chunk_tokens, self.d_in[h]):
                raise InputError(f"cache chunk {f} has shape {a.shape}; the manifest says "
                                 f"({self.chunk_tokens}, {self.d_in[h]})")
            out[h] = a
        return out

    def chunks(self, position: int = 0) -> Iterator[tuple[dict, int]]:
        i = position
        while True:
            yield {h: jnp.asarray(np.asarray(a), jnp.float32) for h, a in self.load(i).items()}, i + 1
            i += 1


def cache_activations(source, directory: str | Path, tokens: int, *, dtype: str = "float32",
                      progress: bool = True) -> CachedSource:
    """Write `ceil(tokens / chunk)` chunks of `source` to `directory` (one `.npy` per hook per chunk plus
    `manifest.json`) and return a `CachedSource` on them. Training from the cache with the same chunk size
    sees exactly the batches a live run would."""
    from tqdm.auto import tqdm

    directory = Path(directory)
    it = source.chunks(0)
    first, pos = next(it)
    chunk_tokens = next(iter(first.values())).shape[0]
    n = max(1, math.ceil(tokens / chunk_tokens))
    dirs = {h: hook_dir(directory, h) for h in first}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    positions = []
    bar = tqdm(total=n * chunk_tokens, unit="tok", desc="caching activations", disable=not progress)
    chunk = first
    for i in range(n):
        if i:
            chunk, pos = next(it)
        for h, a in chunk.items():
            np.save(dirs[h] / f"{i:06d}.npy", np.asarray(a).astype(dtype))
        positions.append(pos)
        bar.update(chunk_tokens)
    bar.close()
    manifest = dict(hooks=list(first), d_in={h: int(a.shape[1]) for h, a in first.items()}, chunks=n,
                    chunk_tokens=int(chunk_tokens), dtype=dtype, source_positions=positions,
                    meta=getattr(source, "meta", None) or {})
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return CachedSource(directory)
