"""Detoxification with SAE features (Goyal et al. 2025, "Breaking Bad Tokens"): ablate a feature set F, or
steer against its decoder directions on every token, on the inputs where F fires, or on the tokens where it fires.

    F = saes.contrast(m, sae, toxic, benign).top(20, by="freq")
    ablate = FeatureAblation(sae, F)                          # x - sum_{f in F} h_f(x) d_f
    steer = DecoderSteer(sae, F, alpha=4.0)                   # x - alpha sum_{f in F} d_f ("constant")
    tok = DecoderSteer(sae, F, 4.0, gate="per_token")         # only where some f in F fires on the token
    tokens, mask = m.tokenize(prompts)
    rows = DecoderSteer(sae, F, 4.0, gate="per_input", row_gate=fires_anywhere(m, sae, F, tokens, mask))
    models.generate(m, prompts, 30, interventions=(rows,))    # the row gate holds at every decoding step
    jax.vmap(lambda a: models.forward(m, tokens, mask, interventions=(DecoderSteer(sae, F, a),))[0])(alphas)
    fires_anywhere(m, sae, F, tokens, mask, context=n_ctx)    # gate on each row's first n_ctx[b] tokens only
    DecoderSteer(sae, F, 4.0, "per_token", direction=v)       # F's gate, another edit direction (a control)
    TokenSteer(sae, v, 4.0, gate_mask("per_token", m, sae, F, tokens, mask))  # the same, gate read beforehand

`d_f = W_dec[f] / act_scale` is feature f's raw-space decoder direction (as `FeatureSteer` adds). All four are
`interp.interventions.Intervention`s at the SAE's (site, layer) (`where.layers`; the SAE is only evaluated at
that layer), so they compose with any other intervention and `interp.interventions.stack` batches them. Edits
apply to real tokens (attention mask 1, as `FeatureSteer`); feature activations are read only on real tokens
after each row's first (the BOS position SAEs are not trained on, as `Splice` and `contrast`), so ablation
and per-token steering leave that position alone and `fires_anywhere` ignores it. `alpha` (a scalar), the
feature set (int `[n]`, de-duplicated) and the row gate (bool `[B]`) are array leaves.

The per-input gate reads a row's *context* only when told where it ends (`fires_anywhere(..., context=)`):
scoring a continuation under a gate that also read that continuation leaks the scored text into the gate (a
hateful continuation switches steering on for its own row). Rows with the same context tokens share one read,
so they get the same gate by construction. `TokenSteer` is any tier with its gate read beforehand
(`gate_mask`): light array leaves only (no SAE), so stacks of hundreds of control directions are cheap to sweep.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from interp.interventions import Intervention, Where, at
from models.checks import Extent, check_index
from models.errors import InputError
from saes.core.evaluate import real_positions
from saes.analysis.features import _after_first, _encode_batch, site_acts
from saes.core.sae import SAE

__all__ = ["DecoderSteer", "FeatureAblation", "GATES", "TokenSteer", "fires_anywhere", "gate_mask", "token_gate"]

GATES = ("constant", "per_input", "per_token")


def _feature_set(sae: SAE, features, name: str) -> Int[Array, " n"]:
    """Sorted unique feature indices `[n]` (InputError naming `name` for one outside the SAE)."""
    f = np.unique(np.asarray(features))
    f = f.astype(np.int32) if f.size == 0 else f
    check_index(name, f, sae.width, f"an SAE of {sae.width} features")
    return jnp.asarray(f, jnp.int32)


def _directions(sae: SAE, features) -> Float[Array, "n d_in"]:
    return sae.W_dec[features] / sae.act_scale


class _AtSAE(Intervention):
    """What the detox interventions share: the SAE, the feature set, the site and `where` of the SAE's layer;
    `_edit(x [B, T, d_in] float32, ctx)` is applied to real tokens, at that layer only."""

    sae: SAE
    features: Int[Array, " n"]
    site: str = eqx.field(static=True)
    where: Where

    def _setup(self, sae: SAE, features) -> None:
        self.sae, self.site = sae, sae.site
        self.features = _feature_set(sae, features, f"{type(self).__name__} features")
        self.where = at(sae.site, sae.layer)

    def _edit(self, x, ctx):
        raise NotImplementedError

    def _acts(self, x, ctx) -> Float[Array, "B T n"]:
        """h_f(x) for f in F, 0 on the first token of each row (see the module docstring)."""
        return jnp.where(real_positions(ctx)[..., None], self.sae.encode(x)[..., self.features], 0.0)

    def edit(self, value, ctx):
        B, T = value.shape[:2]
        x = value.reshape(B, T, -1).astype(jnp.float32)
        new = jnp.where((ctx.attention_mask > 0)[..., None], self._edit(x, ctx), x)
        return new.astype(value.dtype).reshape(value.shape)


class FeatureAblation(_AtSAE):
    """`x - sum_{f in F} h_f(x) d_f`: the spliced reconstruction with `h_f = 0` for f in F plus the SAE's error,
    so only those features' contributions are removed."""

    def __init__(self, sae: SAE, features):
        self._setup(sae, features)

    def _edit(self, x, ctx):
        return x - self._acts(x, ctx) @ _directions(self.sae, self.features)


class DecoderSteer(_AtSAE):
    """`x - alpha * sum_{f in F} d_f` where `gate` says: `"constant"` every real token; `"per_token"` the tokens
    where some f in F fires (`h_f(x_t) > 0`, from the activation being edited, so also at each decoding step);
    `"per_input"` the rows where `row_gate [B]` is True (`fires_anywhere` builds it before the forward /
    `models.generate`, whose decoding steps keep it). `alpha` is a scalar (vmap over it for a sweep).
    `direction` `[d_in]` (raw space) replaces `sum_F d_f` as the edit, F still gating: a control that edits
    the same tokens along another direction."""

    alpha: Float[Array, ""]
    row_gate: Bool[Array, " B"] | None
    direction: Float[Array, " d_in"] | None
    gate: str = eqx.field(static=True)

    def __init__(self, sae: SAE, features, alpha, gate: str = "constant", row_gate=None, direction=None):
        if gate not in GATES:
            raise InputError(f"DecoderSteer: gate={gate!r} is not one of {', '.join(map(repr, GATES))}")
        if gate == "per_input" and row_gate is None:
            raise InputError("DecoderSteer: gate='per_input' needs row_gate, a [batch] bool (fires_anywhere builds it)")
        if gate != "per_input" and row_gate is not None:
            raise InputError(f"DecoderSteer: row_gate is only for gate='per_input', got gate={gate!r}")
        self._setup(sae, features)
        self.alpha, self.gate = jnp.asarray(alpha, jnp.float32), gate
        self.row_gate = None if row_gate is None else jnp.asarray(row_gate, bool)
        if self.alpha.ndim != 0:
            raise InputError(f"DecoderSteer: alpha has shape {self.alpha.shape}; it is a scalar (jax.vmap over a "
                             "function of it to sweep several)")
        if self.row_gate is not None and self.row_gate.ndim != 1:
            raise InputError(f"DecoderSteer: row_gate has shape {self.row_gate.shape}; it is [batch] bool")
        self.direction = None if direction is None else _direction(direction, sae.d_in, "DecoderSteer direction")

    def _edit(self, x, ctx):
        v = _directions(self.sae, self.features).sum(0) if self.direction is None else self.direction
        new = x - self.alpha * v
        if self.gate == "per_token":
            return jnp.where(jnp.any(self._acts(x, ctx) > 0, -1)[..., None], new, x)
        if self.gate == "per_input":
            if self.row_gate.shape[0] != x.shape[0]:
                raise InputError(f"DecoderSteer: row_gate has {self.row_gate.shape[0]} rows, this input "
                                 f"{x.shape[0]}")
            return jnp.where(self.row_gate[:, None, None], new, x)
        return new

    def validate(self, ext: Extent) -> None:
        super().validate(ext)
        if self.row_gate is not None and ext.lengths is not None:
            rows = np.shape(self.row_gate)[int(ext.stacked):]
            if rows != (len(ext.lengths),):
                raise InputError(f"DecoderSteer: row_gate has shape {rows}; it is [{len(ext.lengths)}], one per row "
                                 "of this input")


def _direction(v, d_in: int, name: str) -> Float[Array, " d_in"]:
    v = jnp.asarray(v, jnp.float32)
    if v.shape != (d_in,) or not bool(jnp.all(jnp.isfinite(v))):
        raise InputError(f"{name} has shape {v.shape}; it is [{d_in}] (the SAE's d_in), finite")
    return v


class TokenSteer(Intervention):
    """`x - alpha * direction` on the tokens where `gate [B, T]` (bool, read beforehand) is True, at the SAE's
    (site, layer): `DecoderSteer` of any tier with the gate given (`gate_mask` builds it). In a forward of the
    batch the gate was read on, `TokenSteer(sae, sum_F d_f, a, gate_mask(tier, m, sae, F, tokens, mask))`
    equals `DecoderSteer(sae, F, a, tier, ...)` (an edit at a layer cannot change that layer's own input, so
    the per-token gate read from the unsteered forward is the one DecoderSteer reads); in generation the new
    tokens have no gate (use `DecoderSteer`). Its leaves are light (`direction [d_in]`, `alpha`, the gate):
    a stack of many directions and strengths costs no SAE copies."""

    site: str = eqx.field(static=True)
    direction: Float[Array, " d_in"]
    alpha: Float[Array, ""]
    gate: Bool[Array, "B T"]
    where: Where

    def __init__(self, sae: SAE, direction, alpha, gate):
        self.site, self.where = sae.site, at(sae.site, sae.layer)
        self.direction = _direction(direction, sae.d_in, "TokenSteer direction")
        self.alpha, self.gate = jnp.asarray(alpha, jnp.float32), jnp.asarray(gate, bool)
        if self.alpha.ndim != 0:
            raise InputError(f"TokenSteer: alpha has shape {self.alpha.shape}; it is a scalar (stack several)")
        if self.gate.ndim != 2:
            raise InputError(f"TokenSteer: gate has shape {self.gate.shape}; it is [batch, seq] bool")

    def edit(self, value, ctx):
        B, T = value.shape[:2]
        if self.gate.shape != (B, T):
            raise InputError(f"TokenSteer: gate has shape {self.gate.shape}, this input [{B}, {T}] (a gate is read "
                             "for one batch; generation's new tokens have none: use DecoderSteer)")
        x = value.reshape(B, T, -1).astype(jnp.float32)
        on = self.gate & (ctx.attention_mask > 0)
        new = jnp.where(on[..., None], x - self.alpha * self.direction, x)
        return new.astype(value.dtype).reshape(value.shape)

    def validate(self, ext: Extent) -> None:
        super().validate(ext)
        if ext.new_tokens:
            raise InputError("TokenSteer: its gate covers the prompt's tokens only; in generation use DecoderSteer")
        if ext.lengths is not None:
            shape = np.shape(self.gate)[int(ext.stacked):]
            if shape != (len(ext.lengths), ext.seq_len):
                raise InputError(f"TokenSteer: gate has shape {shape}; it is [{len(ext.lengths)}, {ext.seq_len}], "
                                 "one per token of this input")


def token_gate(model, sae: SAE, features, tokens, mask) -> np.ndarray:
    """[B, T] bool: some f in `features` fires (> 0) on the token, over the real tokens after each row's first,
    in the unsteered forward of `tokens`, `mask` `[B, T]`: `DecoderSteer`'s per-token gate."""
    f = _feature_set(sae, features, "token_gate features")
    acts = site_acts(model, sae, tokens, mask)
    h = _encode_batch(sae, acts, jnp.asarray(_after_first(mask)))
    return np.asarray(jnp.any(h[..., f] > 0, -1))


def fires_anywhere(model, sae: SAE, features, tokens, mask, context=None) -> np.ndarray:
    """[B] bool: some f in `features` fires (> 0) on some token of each row's context, after the first token,
    in the unsteered forward of that context: `DecoderSteer`'s per-input gate. `tokens`, `mask` `[B, T]` are
    left-padded (as `model.tokenize` gives); `context [B]` (default: every real token) counts each row's context
    tokens from its first real token, so a scored continuation after them never gates its own row. Each
    distinct context is read once (in a batch of its own): rows sharing a context share the gate exactly."""
    f = _feature_set(sae, features, "fires_anywhere features")
    tokens, real = np.asarray(tokens), np.asarray(mask) > 0
    lengths = real.sum(1)
    n = lengths if context is None else np.asarray(context)
    if n.shape != lengths.shape or not np.issubdtype(n.dtype, np.integer) or np.any(n < 1) or np.any(n > lengths):
        raise InputError(f"fires_anywhere context: {n.tolist()} must be [{len(lengths)}] ints, each in 1..the row's "
                         f"real tokens {lengths.tolist()}")
    rows = [tuple(int(t) for t in tokens[b][real[b]][: n[b]]) for b in range(len(n))]
    distinct = list(dict.fromkeys(rows))
    width = max(map(len, distinct))
    tok, msk = np.zeros((len(distinct), width), np.int32), np.zeros((len(distinct), width), np.int32)
    for i, r in enumerate(distinct):
        tok[i, width - len(r):], msk[i, width - len(r):] = r, 1
    fires = dict(zip(distinct, token_gate(model, sae, f, tok, msk).any(1)))
    return np.asarray([bool(fires[r]) for r in rows])


def gate_mask(tier: str, model, sae: SAE, features, tokens, mask, context=None) -> np.ndarray:
    """[B, T] bool: the tokens `DecoderSteer(sae, features, a, tier)` edits in a forward of this batch (its
    per-input gate from `fires_anywhere(..., context)`), for `TokenSteer`."""
    if tier not in GATES:
        raise InputError(f"gate_mask: tier={tier!r} is not one of {', '.join(map(repr, GATES))}")
    real = np.asarray(mask) > 0
    if tier == "constant":
        return real
    if tier == "per_input":
        return real & fires_anywhere(model, sae, features, tokens, mask, context)[:, None]
    return real & token_gate(model, sae, features, tokens, mask)
