"""Captured activations the way TransformerLens users read them: `[site, layer]` or TL hook names.

    caps = ("resid_post", models.Capture("attn.pattern", layers=(3,)), "blocks.5.attn.hook_z")
    logits, acts = models.forward(m, tokens, attention_mask=mask, capture=caps)
    a = models.Activations(acts, mask, caps)         # a light view; `a.acts` is the plain dict (a pytree)
    a["resid_post", 10]                                # [B, T, D], padded: the batch as the forward ran it
    a["blocks.10.hook_resid_post"]                     # the same array, by its TransformerLens name
    a["pattern", 3], a["blocks.3.attn.hook_pattern"]   # [B, H, T, S], padded
    a.rows("resid_post", 10)                           # unpadded: one [T_b, D] per row, left padding removed
    a.tl_cache()                                       # {"blocks.10.hook_resid_post": [B, T, D], ...}
    logits, a = models.run_with_cache(m, ["a text", "another text"], capture=("resid_post",))
    a.tokens, a.str_tokens                             # [B, T] padded ids; each row's tokens as text, unpadded

Indexing (`a[...]`) always returns the padded arrays as captured (`[B, T, ...]`, padding positions included,
rows aligned); only `rows(...)` and `str_tokens` remove padding, returning one array / list per row.

Names map both ways through the site registry (`models.sites.Site.tl`, `models.Hook`): `Hook("attn.z", 3).tl
== to_tl_name("attn.z", 3) == "blocks.3.attn.hook_z"`, `from_tl_name("blocks.3.attn.hook_z") == ("attn.z", 3)`. Layer sites live inside
`blocks.{layer}.`; `embed` is `hook_embed` and `final_norm` is `ln_final.hook_normalized`. Where the values
differ from TransformerLens's: `attn.scores` is before masking (TL's `hook_attn_scores` has -inf on masked
keys), `embed` includes GPT-2's learned position embedding (TL: `hook_embed` + `hook_pos_embed`), and norms
are not folded (TL's `fold_ln=True` default removes the norm weights from `hook_normalized`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Int

from models.errors import InputError
from models.model import as_captures, forward, tokens_and_mask
from models.sites import ALL_SITES, SITES, TL_NAMES, Hook, names_layer

__all__ = ["Activations", "TL_NAMES", "from_tl_name", "run_with_cache", "to_tl_name"]

# TL's short names (`cache["pattern", 3]`): the hook's last part without `hook_`, where it names one site only
_short = [(s.tl.rsplit(".", 1)[-1].removeprefix("hook_"), s.name) for s in SITES.values() if s.per_layer]
_SHORT = {k: v for k, v in _short if [a for a, _ in _short].count(k) == 1}


def to_tl_name(site: str, layer: int | None = None) -> str:
    """The TransformerLens hook name of `site` (at `layer`, for layer sites): `blocks.10.hook_resid_post`
    (`Hook(site, layer).tl`)."""
    return Hook(site, layer).tl


def from_tl_name(name: str) -> tuple[str, int | None]:
    """`(site, layer)` of a TransformerLens hook name (`layer` None for `hook_embed`, `ln_final.hook_normalized`;
    `tuple(Hook.from_tl(name))`)."""
    return tuple(Hook.from_tl(name))


class Activations:
    """A view of `models.forward`'s `{site: array}` that indexes by `[site, layer]` or TransformerLens hook
    name (padded arrays, as captured) and strips each row's left padding on request (`rows`). `capture` is what
    was given to `models.forward` (it says which layers and positions each site holds; `start_layer` too when
    the forward started later). `tokens` (`[B, T]`) and `tokenizer` are optional (`run_with_cache` passes
    them) and give `.tokens` / `.str_tokens`. A pytree whose leaves are the arrays of `acts`, `mask` and
    `tokens`."""

    def __init__(self, acts: Mapping[str, Array], mask: Int[ArrayLike, "B T"] | None, capture: Sequence,
                 start_layer: int = 0, *, tokens: Int[ArrayLike, "B T"] | None = None, tokenizer=None):
        caps = {c.site: c for c in as_captures(capture)}
        missing = sorted(set(acts) - set(caps))
        if missing:
            raise InputError(f"Activations: sites {missing} are in acts but not in capture; pass the capture= "
                             "given to models.forward")
        meta = []
        for site, c in caps.items():
            if site not in acts:
                continue
            n = np.shape(acts[site])[0] if SITES[site].per_layer else 0
            layers = (tuple(int(l) for l in c.layers) if c.layers is not None
                      else tuple(range(start_layer, start_layer + n))) if SITES[site].per_layer else None
            if layers is not None and len(layers) != n:
                raise InputError(f"Activations: {site!r} holds {n} layers but capture names {len(layers)} ({layers})")
            meta.append((site, layers, c.positions))
        if tokens is not None and mask is not None and np.shape(tokens) != np.shape(mask):
            raise InputError(f"Activations: tokens {np.shape(tokens)} and mask {np.shape(mask)} differ in shape")
        self._init(dict(acts), mask, tuple(meta), tokens, tokenizer)

    def _init(self, acts, mask, meta, tokens=None, tokenizer=None):
        self.acts, self.mask, self._meta, self._tokens, self.tokenizer = acts, mask, meta, tokens, tokenizer
        self._layers = {site: layers for site, layers, _ in meta}
        self._positions = {site: positions for site, _, positions in meta}

    def keys(self):
        return self.acts.keys()

    @property
    def tokens(self) -> Int[ArrayLike, "B T"]:
        """The token ids `[B, T]` the activations were computed on (padded, as run)."""
        if self._tokens is None:
            raise InputError("Activations has no tokens: build it with tokens= (models.run_with_cache does)")
        return self._tokens

    @property
    def str_tokens(self) -> list[list[str]]:
        """Each row's real tokens as display text (padding removed, specials kept), as TransformerLens's
        `model.to_str_tokens`; needs `tokens=` and `tokenizer=` (`models.run_with_cache` passes both)."""
        if self.tokenizer is None:
            raise InputError("Activations has no tokenizer: build it with tokenizer= (models.run_with_cache does)")
        tokens = np.asarray(self.tokens)
        mask = np.ones(tokens.shape, bool) if self.mask is None else np.asarray(self.mask) > 0
        return [[self.tokenizer.decode([int(i)], skip_special=False) for i in row[keep]]
                for row, keep in zip(tokens, mask)]

    def tl_cache(self) -> dict[str, Array]:
        """Every captured stream under its TransformerLens hook name, one entry per layer (a TL-style
        `{name: array}` cache, e.g. `{"blocks.3.hook_resid_post": [B, T, D], "hook_embed": [B, T, D]}`);
        the arrays are the padded ones `a[name]` returns."""
        out = {}
        for site, layers, _ in self._meta:
            for layer in (None,) if layers is None else layers:
                name = Hook(site, layer).tl
                out[name] = self[name]
        return out

    def __contains__(self, key) -> bool:
        try:
            self._resolve(key)
        except InputError:
            return False
        return True

    def layers(self, site: str) -> tuple[int, ...] | None:
        """The layers `site` holds, in order along its leading axis (None for `embed` / `final_norm`)."""
        return self._layers[self._resolve(site)[0]]

    def _resolve(self, key) -> tuple[str, int | None]:
        """`(site, layer)` of a key: a site, a `Hook`, a TL hook name, or `(site or TL short name, layer)`."""
        if isinstance(key, Hook):
            site, layer = key
        elif isinstance(key, tuple):
            if len(key) != 2:
                raise InputError(f"index with [site, layer], got {key!r}")
            name, layer = key
            site = name if name in SITES else _SHORT.get(name)
            if site is None:
                raise InputError(f"unknown site {name!r} in [site, layer]; known sites: {', '.join(ALL_SITES)}; "
                                 f"TransformerLens short names: {', '.join(sorted(_SHORT))}")
            if not SITES[site].per_layer:
                raise InputError(f"site {site!r} is not per layer; index it as [{site!r}]")
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
                raise InputError(f"layer must be an int, got {layer!r}")
        elif key in SITES:
            site, layer = key, None
        elif names_layer(key):
            site, layer = Hook.parse(key)
        else:
            raise InputError(f"unknown activation {key!r}: use a site ({', '.join(ALL_SITES)}), [site, layer] or a "
                             "TransformerLens hook name such as blocks.3.hook_resid_post")
        if site not in self.acts:
            raise InputError(f"{site!r} was not captured (captured: {', '.join(self.acts) or 'nothing'}); add it "
                             "to capture=")
        return site, layer

    def __getitem__(self, key) -> Array:
        """`a[site]`: the array as captured (layer sites stacked `[layers, B, ...]`); `a[site, layer]`,
        `a[Hook(site, layer)]`, `a["blocks.{layer}.hook_..."]`, `a["L{layer}.site"]`: that layer's `[B, ...]`.
        Always padded (`[B, T, ...]` with each row's padding positions); `rows` removes the padding."""
        site, layer = self._resolve(key)
        x = self.acts[site]
        if layer is None:
            return x
        held = self._layers[site]
        if int(layer) not in held:
            span = f"{held[0]} to {held[-1]}" if held and held == tuple(range(held[0], held[-1] + 1)) else list(held)
            raise InputError(f"layer {int(layer)} of {site!r} was not captured (captured layers: {span})")
        return x[held.index(int(layer))]

    def rows(self, key, layer: int | None = None) -> list[Array]:
        """Each row of `self[key]` (or `self[key, layer]`) with its padding removed along every sequence
        axis (T, and S for attention): a list of B arrays, e.g. `[T_b, D]`. Needs concrete `mask`."""
        site, layer = self._resolve(key if layer is None else (key, layer))
        x = self[site] if layer is None else self[site, layer]
        if self.mask is None:
            raise InputError("Activations has no mask, so there is no padding to strip")
        if self._positions[site] is not None:
            raise InputError(f"{site!r} was captured at positions {self._positions[site]}, not the whole "
                             "sequence; its padding cannot be located")
        mask = np.asarray(self.mask) > 0
        axes = ("layers",) * (SITES[site].per_layer and layer is None) + SITES[site].axes
        b_axis = axes.index("batch")
        seq_axes = [i - 1 for i, a in enumerate(axes) if a in ("seq", "kv_seq")]  # after the batch axis is taken
        if any(np.shape(x)[i + 1] != mask.shape[1] for i in seq_axes):
            raise InputError(f"{site!r} has shape {np.shape(x)} but the mask is {mask.shape}")
        out = []
        for b in range(mask.shape[0]):
            xb = jnp.take(x, b, axis=b_axis)
            keep = jnp.asarray(np.flatnonzero(mask[b]))
            for ax in seq_axes:
                xb = jnp.take(xb, keep, axis=ax)
            out.append(xb)
        return out

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(np.shape(v))}" for k, v in self.acts.items())
        return f"Activations({shapes})"


def _flatten(a: Activations):
    return (a.acts, a.mask, a._tokens), (a._meta, a.tokenizer)


def _unflatten(aux, children):
    a = object.__new__(Activations)
    a._init(children[0], children[1], aux[0], children[2], aux[1])
    return a


jax.tree_util.register_pytree_node(Activations, _flatten, _unflatten)


def run_with_cache(model, tokens, attention_mask=None, capture: Sequence | None = None, **kwargs):
    """`models.forward` returning `(logits, Activations)`, as TransformerLens's `run_with_cache`. `tokens` may be
    texts (tokenised and masked as `models.forward` does). `capture=None` keeps every site except the per-head
    outputs `attn.head_out` (TL's `use_attn_result=False` default); other keywords go to `models.forward`."""
    tokens, attention_mask = tokens_and_mask(model, tokens, attention_mask)
    if capture is None:
        capture = tuple(s for s in ALL_SITES if s != "attn.head_out")
    capture = as_captures(capture)
    logits, acts = forward(model, tokens, attention_mask, capture=capture, **kwargs)
    mask = attention_mask if attention_mask is not None else jnp.ones(np.shape(tokens), jnp.int32)
    return logits, Activations(acts, mask, capture, start_layer=kwargs.get("start_layer", 0), tokens=tokens,
                               tokenizer=model.tokenizer)
