"""Feature inspection: top-activating contexts (streamed), firing frequencies, two-set contrasts, logit effects,
steering.

    top = top_activations(m, sae, rows, n_rows=256, k=10)        # streamed over batches, top-k kept per feature
    top.contexts(m.tokenizer, feature=123)                        # [(activation, "…text «token» text…"), ...]
    freq = feature_frequencies(m, sae, rows, n_rows=256)          # fraction of tokens each feature fires on
    c = contrast(m, sae, toxic_texts, benign_texts)               # per-feature max / freq / mean on two text sets
    c.top(20, by="freq")                                          # features firing more on the first set
    frequency_histogram(freq, "freq.png")
    logit_effects(m, sae, feature=123)                            # top promoted / suppressed tokens
    models.generate(m, prompts, 30, interventions=(steer(sae, 123, 8.0),))           # add 8 x the decoder row
    models.generate(m, prompts, 30, interventions=(steer(sae, 123, 5.0, "clamp"),))  # clamp the feature to 5

Steering is an ordinary `interp.interventions.Intervention` at the SAE's (site, layer), so it runs on the
prompt pass and at every decoding step of `models.generate`, composes with any other intervention, and is
checked against the model it meets (a layer outside it is an InputError).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import models
from models.checks import check_index
from models.errors import InputError
from models.transformer import unembedding
from interp.interventions import Intervention, Where, at
from saes.core.sae import SAE

__all__ = ["FeatureContrast", "FeatureSteer", "TopActivations", "contrast", "feature_frequencies",
           "frequency_histogram", "logit_effects", "site_acts", "steer", "top_activations"]


def site_acts(model, sae: SAE, tokens, mask):
    """[B, T, d_in] activations of the SAE's (site, layer) for a token batch (forward stopped after it)."""
    layer = sae.layer
    cap = models.Capture(sae.site, layers=(layer,) if layer is not None else None)
    stop = layer + 1 if layer is not None else None
    _, acts = models.forward(model, jnp.asarray(tokens), attention_mask=jnp.asarray(mask), capture=(cap,),
                             stop_at_layer=stop)
    a = acts[sae.site]
    a = a[0] if layer is not None else a
    return a.reshape(a.shape[0], a.shape[1], -1)


@eqx.filter_jit
def _encode_batch(sae, acts, valid):
    f = sae.encode(acts.astype(jnp.float32))
    return jnp.where(valid[..., None], f, 0.0)


@dataclass
class TopActivations:
    """Per feature, the `k` largest activations seen (`values [width, k]`, descending) and where they were
    (`row`, `pos` into `tokens [n_rows, T]`)."""

    values: np.ndarray
    row: np.ndarray
    pos: np.ndarray
    tokens: np.ndarray

    def contexts(self, tokenizer, feature: int, window: int = 12) -> list[tuple[float, str]]:
        """`(activation, text)` for each kept example of `feature`, the max token marked «like this»."""
        out = []
        for v, r, p in zip(self.values[feature], self.row[feature], self.pos[feature]):
            if v <= 0:
                continue
            row = self.tokens[r]
            left = tokenizer.decode(row[max(p - window, 0):p], skip_special=True)
            mid = tokenizer.decode(row[p:p + 1], skip_special=True)
            right = tokenizer.decode(row[p + 1:p + 1 + window // 3], skip_special=True)
            out.append((float(v), f"{left}«{mid}»{right}"))
        return out


@jax.jit
def _merge_topk(values, index, f_batch, offset):
    """Merge a batch's activations `f_batch [N, width]` into the running top-k (`values`, `index`: flat
    token ids) per feature."""
    k = values.shape[1]
    n = f_batch.shape[0]
    kb = min(k, n)
    bv, bi = jax.lax.top_k(f_batch.T, kb)  # [width, kb]
    allv = jnp.concatenate([values, bv], 1)
    alli = jnp.concatenate([index, bi + offset], 1)
    v, sel = jax.lax.top_k(allv, k)
    return v, jnp.take_along_axis(alli, sel, 1)


def top_activations(model, sae: SAE, rows, n_rows: int = 256, k: int = 10, batch: int = 16,
                    exclude_first: bool = True) -> TopActivations:
    """Stream `n_rows` token rows (`rows`: a `TokenRows`, an iterator of int rows, or an array `[N, T]`)
    through the model and the SAE, keeping each feature's `k` largest activations (BOS / first positions
    excluded when `exclude_first`)."""
    it = iter(rows.rows(0) if hasattr(rows, "rows") else rows)
    kept = []
    values = jnp.zeros((sae.width, k), jnp.float32)
    index = jnp.zeros((sae.width, k), jnp.int32)
    seen = 0
    while seen < n_rows:
        chunk = [r for _, r in zip(range(min(batch, n_rows - seen)), it)]
        if not chunk:
            break
        tokens = np.stack(chunk).astype(np.int32)
        mask = np.ones_like(tokens)
        acts = site_acts(model, sae, tokens, mask)
        valid = jnp.ones(tokens.shape, bool).at[:, 0].set(not exclude_first)
        f = _encode_batch(sae, acts, valid).reshape(-1, sae.width)
        values, index = _merge_topk(values, index, f, seen * tokens.shape[1])
        kept.append(tokens)
        seen += len(chunk)
    tokens = np.concatenate(kept)
    T = tokens.shape[1]
    index = np.asarray(index)
    return TopActivations(np.asarray(values), index // T, index % T, tokens)


def feature_frequencies(model, sae: SAE, rows, n_rows: int = 256, batch: int = 16) -> np.ndarray:
    """Fraction of (non-BOS) tokens on which each feature fires, over `n_rows` rows."""
    it = iter(rows.rows(0) if hasattr(rows, "rows") else rows)
    counts = jnp.zeros((sae.width,), jnp.float32)
    n_tok, seen = 0, 0
    while seen < n_rows:
        chunk = [r for _, r in zip(range(min(batch, n_rows - seen)), it)]
        if not chunk:
            break
        tokens = np.stack(chunk).astype(np.int32)
        acts = site_acts(model, sae, tokens, np.ones_like(tokens))
        valid = jnp.ones(tokens.shape, bool).at[:, 0].set(False)
        f = _encode_batch(sae, acts, valid)
        counts = counts + (f > 0).sum((0, 1))
        n_tok += tokens.shape[0] * (tokens.shape[1] - 1)
        seen += len(chunk)
    return np.asarray(counts) / max(n_tok, 1)


def _after_first(mask) -> np.ndarray:
    """[B, T] bool: the real tokens of left-padded rows other than each row's first (BOS / first position)."""
    mask = np.asarray(mask) > 0
    return mask & (np.cumsum(mask, 1) > 1)


@eqx.filter_jit
def _set_stats(sae, acts, valid):
    """Per feature over the valid tokens of a batch: max, count of tokens firing (> 0), sum."""
    f = _encode_batch(sae, acts, valid)
    return jnp.where(valid[..., None], f, -jnp.inf).max((0, 1)), (f > 0).sum((0, 1)), f.sum((0, 1))


def _text_stats(model, sae: SAE, texts: Sequence[str], batch: int, name: str):
    """(max, freq, mean) `[width]` and the token count over the real tokens after the first of `texts`."""
    if isinstance(texts, str) or not len(texts):
        raise InputError(f"contrast: {name} must be a non-empty sequence of texts, got {texts!r:.60}")
    tokens, mask = model.tokenize(list(texts))  # one padded width for every batch: one compiled forward
    valid = _after_first(mask)
    top = jnp.full((sae.width,), -jnp.inf)
    fires = jnp.zeros((sae.width,), jnp.int32)
    total = jnp.zeros((sae.width,), jnp.float32)
    for i in range(0, len(tokens), batch):
        acts = site_acts(model, sae, tokens[i:i + batch], mask[i:i + batch])
        m, c, t = _set_stats(sae, acts, jnp.asarray(valid[i:i + batch]))
        top, fires, total = jnp.maximum(top, m), fires + c, total + t
    n = int(valid.sum())
    if n == 0:
        raise InputError(f"contrast: {name} has no tokens after the first of each text (single-token texts?)")
    return np.asarray(top), np.asarray(fires) / n, np.asarray(total) / n, n


@dataclass(frozen=True, eq=False)
class FeatureContrast:
    """Per-feature statistics `[width]` of an SAE on two text sets `a` (e.g. toxic) and `b` (e.g. benign), over
    the real tokens after each text's first: `max_*` activation, `freq_*` (fraction of tokens where the feature
    is > 0), `mean_*` activation; `n_tokens_*` tokens counted."""

    max_a: np.ndarray
    max_b: np.ndarray
    freq_a: np.ndarray
    freq_b: np.ndarray
    mean_a: np.ndarray
    mean_b: np.ndarray
    n_tokens_a: int
    n_tokens_b: int

    def top(self, k: int, by: str = "max") -> np.ndarray:
        """The `k` features (int indices, best first) ranked by `max_a - max_b` (`by="max"`), `freq_a - freq_b`
        (`"freq"`), `mean_a - mean_b` (`"mean_diff"`) or the add-one-smoothed firing-rate ratio
        `((c_a + 1) / (n_a + 1)) / ((c_b + 1) / (n_b + 1))` of the firing counts `c` (`"ratio"`: specific to set
        a, with the smoothing discounting features seen a few times only), among the features that fire on set a."""
        if by not in ("max", "freq", "mean_diff", "ratio"):
            raise InputError(f"FeatureContrast.top: by={by!r} is not one of 'max', 'freq', 'mean_diff', 'ratio'")
        fire = np.flatnonzero(self.freq_a > 0)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(fire):
            raise InputError(f"FeatureContrast.top: k={k!r} out of range: {len(fire)} features fire on set a "
                             f"(valid: 1..{len(fire)})")
        if by == "ratio":
            rate = lambda f, n: (f * n + 1) / (n + 1)  # noqa: E731
            score = np.log(rate(self.freq_a, self.n_tokens_a)) - np.log(rate(self.freq_b, self.n_tokens_b))
        else:
            a, b = {"max": (self.max_a, self.max_b), "freq": (self.freq_a, self.freq_b),
                    "mean_diff": (self.mean_a, self.mean_b)}[by]
            score = a - b
        order = np.argsort(-score[fire], kind="stable")
        return fire[order[:k]]


def contrast(model, sae: SAE, texts_a: Sequence[str], texts_b: Sequence[str], batch: int = 16) -> FeatureContrast:
    """`FeatureContrast` of `sae` on two text sets (each tokenized as `model.tokenize` does, left-padded, run in
    batches of `batch` texts through a forward stopped after the SAE's layer)."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise InputError(f"contrast: batch={batch!r} must be a positive integer")
    a = _text_stats(model, sae, texts_a, batch, "texts_a")
    b = _text_stats(model, sae, texts_b, batch, "texts_b")
    return FeatureContrast(a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3])


def frequency_histogram(freq, path=None, title: str = "feature firing frequency"):
    """Histogram of log10 firing frequencies (dead features counted separately in the title)."""
    # a bare Agg figure, not pyplot: `matplotlib.use("Agg")` here switched a notebook's inline backend off
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    freq = np.asarray(freq)
    dead = int((freq == 0).sum())
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(np.log10(freq[freq > 0]), bins=60)
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("features")
    ax.set_title(f"{title} ({dead} of {freq.size} never fired)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def logit_effects(model, sae: SAE, feature: int, n: int = 10) -> dict[str, list[tuple[str, float]]]:
    """Direct effect of a feature's decoder direction on the logits (through the final norm's weights and
    the unembedding, ignoring the norm's data-dependent scale): the `n` most promoted and suppressed tokens."""
    params = model.params
    check_index("logit_effects feature", np.asarray([feature]), sae.W_dec.shape[0],
                f"an SAE of {sae.W_dec.shape[0]} features")
    direction = sae.W_dec[feature] / sae.act_scale
    if direction.shape[0] != model.cfg.d_model:
        raise ValueError(f"logit effects need a d_model-sized site, {sae.site} has width {direction.shape[0]}")
    w = params["ln_final"]["w"].astype(jnp.float32)
    W_U = unembedding(params)
    effect = np.asarray((direction * w) @ W_U.astype(jnp.float32))
    order = np.argsort(effect)
    tok = model.tokenizer

    def name(i):
        return tok.decode([int(i)], skip_special=False)

    return {"promoted": [(name(i), float(effect[i])) for i in order[::-1][:n]],
            "suppressed": [(name(i), float(effect[i])) for i in order[:n]]}


class FeatureSteer(Intervention):
    """An intervention at the SAE's (site, layer): `mode="add"` adds `value` x the feature's (raw-space)
    decoder direction to every real token; `"clamp"` re-encodes the activation and sets the feature to
    `value`, keeping the SAE's reconstruction error (x + (value - f_i) d_i). The feature and the value are
    array leaves (vmap over them for a sweep)."""

    sae: SAE
    feature: jax.Array
    value: jax.Array
    where: Where
    site: str = eqx.field(static=True)
    mode: str = eqx.field(static=True)

    def __init__(self, sae: SAE, feature, value, mode: str = "add"):
        if mode not in ("add", "clamp"):
            raise ValueError(f"mode must be 'add' or 'clamp', got {mode!r}")
        self.sae, self.site, self.mode = sae, sae.site, mode
        self.feature, self.value = jnp.asarray(feature, jnp.int32), jnp.asarray(value, jnp.float32)
        self.where = at(sae.site, sae.layer)

    def edit(self, value, ctx):
        B, T = value.shape[:2]
        x = value.reshape(B, T, -1).astype(jnp.float32)
        d = self.sae.W_dec[self.feature] / self.sae.act_scale
        if self.mode == "add":
            new = x + self.value * d
        else:
            f = self.sae.encode(x)[..., self.feature]
            new = x + (self.value - f)[..., None] * d
        real = (ctx.attention_mask > 0)[..., None]
        return jnp.where(real, new, x).astype(value.dtype).reshape(value.shape)


def steer(sae: SAE, feature: int, value: float, mode: str = "add") -> FeatureSteer:
    """A `FeatureSteer` intervention for `models.forward` / `models.generate` (see the module docstring)."""
    check_index("steer feature", np.asarray([feature]), sae.W_dec.shape[0], f"an SAE of {sae.W_dec.shape[0]} features")
    return FeatureSteer(sae, feature, value, mode)
