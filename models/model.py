"""`Model`: config + parameters + tokenizer, a pytree whose only leaves are the parameters."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from jaxtyping import Int

from models import transformer
from models.checks import check_call
from models.config import Config
from models.errors import InputError, ModelFileError
from models.loading import load_gguf, load_hf_dir, resolve
from models.sharding import INDIVISIBLE, check_model_fits
from models.sites import SITES, Hook, check_site, names_layer
from models.tokenizer import Tokenizer, from_gguf_metadata, from_hf_dir


def default_dtype() -> str:
    """The dtype policy: float32 on CPU, bfloat16 weights/activations on accelerators (norms/softmax stay float32)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@partial(jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["cfg", "tokenizer", "name"])
@dataclass(frozen=True)
class Model:
    """A loaded model. `params` is the pytree of arrays; `cfg`, `tokenizer` and `name` are static, so a
    `Model` passes through `jax.jit`/`vmap`/`grad` as its parameters."""

    params: dict[str, Any]
    cfg: Config
    tokenizer: Tokenizer | None = None
    name: str = ""

    def tokenize(self, texts: Sequence[str] | str, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded int32 tokens `[B, T]` and attention mask `[B, T]`."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self._tokenizer().batch(texts, max_len=max_len if max_len is not None else self.cfg.n_ctx)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special=skip_special)

    # TransformerLens-style token helpers. `prepend_bos=None` follows the model's convention for a whole
    # prompt (`tokenizer.add_bos`: Gemma yes, SmolLM2 no); fragments (`to_single_token`) never get a BOS.

    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool | None = None) -> Int[np.ndarray, "B T"]:
        """int32 tokens `[B, T]` of one text (B = 1) or of equally long texts. Texts of different lengths
        need a mask: `tokenize` returns `(tokens, mask)` left-padded, and `models.forward` takes the texts."""
        texts = [text] if isinstance(text, str) else list(text)
        tokens, mask = self._tokenizer().batch(texts, max_len=self.cfg.n_ctx, add_bos=prepend_bos)
        if not mask.all():
            lengths = mask.sum(1).tolist()
            raise InputError(f"to_tokens: the texts are {lengths} tokens long, so rows would be padded; use "
                             "model.tokenize(texts) for left-padded (tokens, mask), or pass the texts to "
                             "models.forward")
        return tokens

    def to_str_tokens(self, x: str | Sequence[int] | np.ndarray, prepend_bos: bool | None = None) -> list[str]:
        """Each token as display text (`" Mary"`, not the vocabulary entry `"ĠMary"`; specials kept; a token
        holding part of a multi-byte character shows as "\ufffd", as in TransformerLens), for a text
        (tokenised as `to_tokens` does) or token ids `[T]` / `[1, T]`."""
        ids = self.to_tokens(x, prepend_bos)[0] if isinstance(x, str) else self._ids(x, "to_str_tokens")
        return [self.tokenizer.decode([i], skip_special=False) for i in ids]

    def to_string(self, ids, skip_special: bool = False) -> str | list[str]:
        """The text of token ids `[T]` (one string) or `[B, T]` (one per row; padding is not removed)."""
        arr = np.asarray(ids)
        if arr.ndim == 2:
            return [self.to_string(row, skip_special) for row in arr]
        return self.tokenizer.decode(self._ids(arr, "to_string"), skip_special=skip_special)

    def to_single_token(self, text: str) -> int:
        """The id of `text` if it is exactly one token (no BOS), e.g. `" Paris"`; otherwise an InputError."""
        if not isinstance(text, str):
            raise InputError(f"to_single_token takes a string, got {type(text).__name__}")
        ids = self._tokenizer().encode(text, add_bos=False)
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i], skip_special=False) for i in ids]
            raise InputError(f"to_single_token({text!r}): the text is {len(ids)} tokens, not one: ids {ids} "
                             f"({pieces}); pick a single-token word or pass the ids you mean")
        return ids[0]

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise InputError(f"model {self.name!r} has no tokenizer (loaded with tokenizer=False?); pass token ids")
        return self.tokenizer

    def _ids(self, ids, where: str) -> list[int]:
        """Token ids `[T]` or `[1, T]` as Python ints, each checked to be in the tokenizer's vocabulary."""
        arr = np.asarray(ids)
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise InputError(f"{where} takes a text or integer token ids [T] or [1, T], got shape {arr.shape} "
                             f"dtype {arr.dtype}")
        n = self._tokenizer().vocab_size
        bad = [int(i) for i in arr if not 0 <= i < n]
        if bad:
            raise InputError(f"{where}: token ids {bad[:8]} are outside the vocabulary [0, {n})")
        return [int(i) for i in arr]

    def replace_params(self, params) -> "Model":
        return Model(params, self.cfg, self.tokenizer, self.name)


def load(name_or_path: str | Path, dtype: str | None = None, *, mesh=None, rules=None, tokenizer: bool = True,
         indivisible: str = "warn") -> Model:
    """Load a registered model (`models.REGISTRY`), a `.gguf` file, or a local Hugging Face directory.

    Weights stream from the file into `dtype` (default `default_dtype()`) one tensor at a time (see
    `models.loading`). With `mesh` (a `jax.sharding.Mesh`) every parameter is placed sharded by its logical
    axes through `models.sharding.RULES` (or `rules`), each device's shard read from the file directly; on
    several hosts each process reads only its own devices' shards; a dimension the mesh cannot split (9 heads
    over 8 devices) is replicated, and `indivisible` ("warn", "error", "ignore") says whether that warns
    (`models.sharding.check_divisible`). A Hugging Face directory needs a
    `tokenizer.json` unless `tokenizer=False`, which loads the weights alone (`Model.tokenizer` is None).
    """
    if indivisible not in INDIVISIBLE:
        raise InputError(f"load: indivisible must be one of {INDIVISIBLE}, got {indivisible!r}")
    dtype = dtype or default_dtype()
    path = resolve(name_or_path)
    # the mesh is checked as soon as the config is known, before any weight is read
    fits = None if mesh is None else (lambda cfg: check_model_fits(cfg, mesh, rules, indivisible, "models.load"))
    if path.is_dir():
        if tokenizer and not (path / "tokenizer.json").is_file():
            raise ModelFileError(f"{path} has no tokenizer.json: add it (only fast-tokenizer directories are supported), "
                                 "or pass tokenizer=False to load the weights without a tokenizer")
        cfg, params = load_hf_dir(path, dtype, mesh=mesh, rules=rules, fits=fits)
        tok = from_hf_dir(path) if tokenizer else None
    else:
        cfg, params, meta = load_gguf(path, dtype, mesh=mesh, rules=rules, fits=fits)
        tok = from_gguf_metadata(meta) if tokenizer else None
    return Model(params, cfg, tok, str(name_or_path))


def tokens_and_mask(model: Model, tokens, attention_mask=None):
    """`(tokens, attention_mask)` unchanged, or for a text / list of texts `model.tokenize(texts)`."""
    if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and any(isinstance(t, str) for t in tokens)):
        if not all(isinstance(t, str) for t in ([tokens] if isinstance(tokens, str) else tokens)):
            raise InputError("forward: tokens mixes strings and other values; pass texts or int token ids [B, T]")
        if attention_mask is not None:
            raise InputError("forward: an attention_mask was given with texts; the mask comes from tokenising them")
        return model.tokenize(tokens)
    return tokens, attention_mask


def as_captures(capture) -> tuple[transformer.Capture, ...]:
    """`capture=` as `models.forward` keeps it: one `Capture` per site, in first-mention order. Each entry is a
    site name (every layer), a run key (`"L3.attn.z"`), a TransformerLens hook name (`"blocks.3.attn.hook_z"`,
    `"hook_embed"`), a `Hook`, or a `Capture` (whose site may be any of those spellings). Entries naming the
    same site merge: their layers are united (sorted, as the forward stacks them; every layer if any entry
    asks for every layer), and must agree on positions. An unknown site is an InputError listing the sites."""
    capture = (capture,) if isinstance(capture, (str, Hook, transformer.Capture)) else tuple(capture)
    merged: dict[str, transformer.Capture] = {}
    for c in capture:
        if isinstance(c, transformer.Capture) and not (c.site in SITES or not isinstance(c.site, str)):
            hook = Hook.parse(c.site) if names_layer(c.site) else check_site(c.site)
            if c.layers is not None and hook.layer is not None:
                raise InputError(f"Capture({c.site!r}, layers={c.layers}): the hook name already names layer "
                                 f"{hook.layer}; pass layers= with a site name ({hook.site!r}) instead")
            layers = c.layers if hook.layer is None else (hook.layer,)
            c = transformer.Capture(hook.site, layers, c.positions, c.seq_indices)
        elif isinstance(c, str) and c not in SITES:
            c = Hook.parse(c) if names_layer(c) else check_site(c)  # (check_site raises, listing the sites)
        c = transformer.as_capture(c)
        if isinstance(c.positions, (list, np.ndarray)) or isinstance(c.seq_indices, (list, np.ndarray)):
            tup = lambda x: tuple(int(v) for v in np.ravel(x)) if isinstance(x, (list, np.ndarray)) else x  # hashable
            c = transformer.Capture(c.site, c.layers, tup(c.positions), tup(c.seq_indices))
        if c.layers is not None:
            if isinstance(c.layers, (int, np.integer)) or not all(isinstance(x, (int, np.integer)) for x in c.layers):
                raise InputError(f"Capture({c.site!r}) layers must be a tuple of ints, got {c.layers!r}")
            c = transformer.Capture(c.site, tuple(sorted({int(x) for x in c.layers})), c.positions, c.seq_indices)
        old = merged.get(c.site)
        if old is not None:
            if (old.positions, old.seq_indices) != (c.positions, c.seq_indices):
                raise InputError(f"capture names {c.site!r} twice with different positions ({old.positions} / "
                                 f"{c.positions}); one capture per site keeps one set of positions")
            layers = None if old.layers is None or c.layers is None else tuple(sorted({*old.layers, *c.layers}))
            c = transformer.Capture(c.site, layers, c.positions, c.seq_indices)
        merged[c.site] = c
    return tuple(merged.values())


@partial(jax.jit, static_argnames=("capture", "start_layer", "stop_at_layer", "unroll", "frozen"))
def _forward(model, tokens, attention_mask, positions, interventions, resid, capture, start_layer, stop_at_layer, unroll,
             frozen):
    return transformer.forward(model.params, model.cfg, tokens, attention_mask, positions, capture, interventions,
                               start_layer=start_layer, stop_at_layer=stop_at_layer, resid=resid, unroll=unroll,
                               frozen=frozen)


def forward(model: Model, tokens, attention_mask=None, positions=None, capture: Sequence = (), interventions: Sequence = (),
            *, start_layer: int = 0, stop_at_layer: int | None = None, resid=None, unroll: bool = False,
            frozen: bool = False) -> transformer.Output:
    """Jitted `models.transformer.forward` on a `Model`: `Output(logits [B, T, V], acts {site: activation})`,
    a NamedTuple, so `logits, acts = models.forward(...)` unpacks it.

    `tokens` is int `[B, T]`, or a text / list of texts, tokenised as `model.tokenize` does (the model's BOS
    convention, left-padded, the mask supplied; `model.tokenize(texts)` gives the same tokens and mask).
    Capture nothing by default; `capture=("resid_post", Capture("attn.pattern", layers=(3,)), Hook("attn.z", 5),
    "blocks.2.hook_mlp_out")` keeps those (`as_captures`: run keys and TransformerLens hook names are read as
    hooks, an unknown site is an InputError; `models.Activations(acts, mask, capture)` indexes them by
    `[site, layer]` or TransformerLens hook name).
    Interventions are pytrees (see `interp`), so this is vmappable and differentiable in them; `frozen=True`
    stops gradients through attention patterns and norm scales (`models.transformer.forward`).
    """
    tokens, attention_mask = tokens_and_mask(model, tokens, attention_mask)
    capture = as_captures(capture)
    # concrete checks (token ids, positions per row, selections) before anything is traced
    check_call(model.cfg, tokens, attention_mask, capture, tuple(interventions), start_layer=start_layer,
               stop_layer=stop_at_layer)
    return _forward(model, tokens, attention_mask, positions, tuple(interventions), resid, capture, start_layer,
                    stop_at_layer, unroll, frozen)
