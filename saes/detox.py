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

`d_f = W_dec[f] / act_scale` is feature f's raw-space decoder direction (as `FeatureSteer` adds). All four are
`interp.interventions.Intervention`s at the SAE's (site, layer) (`where.layers`; the SAE is only evaluated at
that layer), so they compose with any other intervention and `interp.interventions.stack` batches them. Edits
apply to real tokens (attention mask 1, as `FeatureSteer`); feature activations are read only on real tokens
after each row's first (the BOS position SAEs are not trained on, as `Splice` and `contrast`), so ablation
and per-token steering leave that position alone and `fires_anywhere` ignores it. `alpha` (a scalar), the
feature set (int `[n]`, de-duplicated) and the row gate (bool `[B]`) are array leaves.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from interp.interventions import Intervention, Where, at
from models.checks import Extent, check_index
from models.errors import InputError
from saes.evaluate import _real
from saes.features import _after_first, _encode_batch, site_acts
from saes.sae import SAE

__all__ = ["DecoderSteer", "FeatureAblation", "GATES", "fires_anywhere"]

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
        return jnp.where(_real(ctx)[..., None], self.sae.encode(x)[..., self.features], 0.0)

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
    `models.generate`, whose decoding steps keep it). `alpha` is a scalar (vmap over it for a sweep)."""

    alpha: Float[Array, ""]
    row_gate: Bool[Array, " B"] | None
    gate: str = eqx.field(static=True)

    def __init__(self, sae: SAE, features, alpha, gate: str = "constant", row_gate=None):
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

    def _edit(self, x, ctx):
        new = x - self.alpha * _directions(self.sae, self.features).sum(0)
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


def fires_anywhere(model, sae: SAE, features, tokens, mask) -> np.ndarray:
    """[B] bool: some f in `features` fires (> 0) on some real token after the first of each row of the unsteered
    forward of `tokens`, `mask` `[B, T]` (left-padded, as `model.tokenize` gives): `DecoderSteer`'s per-input gate."""
    f = _feature_set(sae, features, "fires_anywhere features")
    acts = site_acts(model, sae, tokens, mask)
    h = _encode_batch(sae, acts, jnp.asarray(_after_first(mask)))
    return np.asarray(jnp.any(h[..., f] > 0, (1, 2)))
