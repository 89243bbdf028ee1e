"""Transcoders: dictionaries that read one site and predict another (an MLP's input -> its output).

A transcoder is an `SAE` whose `target` names the site it predicts at its layer (`sae.target == "mlp_out"`,
reading `sae.site`, e.g. `ln2.normalized`): every architecture of `saes.core.sae` works as one, trained by the
same jitted step (`TrainConfig(site=("ln2.normalized",), target="mlp_out", layers=all)`: one transcoder per
layer, all in the same pass). This module holds what a set of per-layer transcoders adds:

    tcs = saes.core.transcoders.TranscoderSet.of(run.saes.values())    # layers 0..L-1, one each
    logits, _ = models.forward(m, tokens, interventions=(tcs.replace_mlps(),))   # every MLP replaced
    tcs.ce_metrics(m, tokens)                  # CE loss recovered with every MLP replaced at once
    saes.io.circuit_tracer.write(tcs, "export/")    # circuit-tracer's per-layer safetensors + config.yaml
    tcs = saes.io.circuit_tracer.read_transcoders("export/")

Inputs and targets are normalised by the input's `act_scale` in training; `fold_scale` bakes it in for export.
Cross-layer transcoders (one dictionary whose features write into every later layer) are `saes.core.cross_layer`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Iterable, final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


from interp.interventions import Intervention, Where
from models.errors import InputError
from models.model import forward
from models.transformer import Capture
from saes.core import sae as sae_lib
from saes.core.dictionary import Replacement, site_width
from saes.core.evaluate import replacement_ce
from saes.core.sae import SAE

__all__ = ["ReplaceMLPs", "StackedTranscoders", "TranscoderSet", "random_set", "replacement_ce"]


class ReplaceMLPs(Intervention):
    """At `target` (mlp_out) of every layer: the transcoder of that layer applied to the layer's `source`
    value (`SiteContext.seen`; a skip transcoder's linear path included), plus `error [L, B, T, D]` when given (the real output minus the prediction:
    with it the replacement reproduces the model exactly). Positions where `keep [B, T]` is True keep the real
    output (the first token, which transcoders are not trained on). `edits` (`saes.circuits.feature_effects.FeatureEdits`)
    set chosen features' activations before decoding (clamp or ablate features in the replacement model)."""

    stacked: SAE  # the layers' transcoders stacked on a leading axis
    error: Float[Array, "L B T D"] | None
    keep: Array | None
    where: Where
    site: str = eqx.field(static=True)
    source: str = eqx.field(static=True)
    edits: eqx.Module | None = None

    def edit(self, value, ctx):
        tc = jax.tree.map(lambda a: a[ctx.layer], self.stacked)
        x = ctx.seen[self.source].astype(jnp.float32)
        acts = tc.encode(x)
        if self.edits is not None:
            acts = self.edits.apply(acts, ctx.layer)
        new = tc.decode(acts) + tc.skip(x)
        if self.error is not None:
            new = new + self.error[ctx.layer]
        if self.keep is not None:
            new = jnp.where(self.keep[..., None], value.astype(jnp.float32), new)
        return new.astype(value.dtype)


@final
class StackedTranscoders(Replacement):
    """A per-layer transcoder set as the replacement interface (`saes.core.dictionary.Replacement`): `stacked`, the
    layers' transcoders as one SAE pytree with arrays `[L, ...]` (`TranscoderSet.stacked`); each feature
    writes into its own layer's target only."""

    stacked: SAE

    @property
    def n_layers(self) -> int:
        return self.stacked.W_enc.shape[0]

    @property
    def skip_weights(self) -> Float[Array, "L D D"] | None:
        return self.stacked.W_skip

    def scales(self) -> Float[Array, " L"]:
        return self.stacked.act_scale.reshape(self.n_layers)

    def pre_acts_layers(self, x: Float[Array, "L ... D"]) -> Float[Array, "L ... W"]:
        return jax.vmap(lambda tc, x: tc.pre_acts(x * tc.act_scale))(self.stacked, x)

    def encode_layers(self, x: Float[Array, "L ... D"]) -> Float[Array, "L ... W"]:
        return jax.vmap(lambda tc, x: tc.activate(tc.pre_acts(x * tc.act_scale), x * tc.act_scale))(self.stacked, x)

    def predict_layers(self, acts: Float[Array, "L ... W"], x: Float[Array, "L ... D"]) -> Float[Array, "L ... D"]:
        return jax.vmap(lambda tc, f, x: tc.decode(f) + tc.skip(x))(self.stacked, acts, x)

    def encoder_rows(self, layer, feature) -> np.ndarray:
        """Host-side: `W_enc[layer, :, feature]` times the layer's input scale, `[n, D]`."""
        return np.asarray(self.stacked.W_enc)[layer, :, feature] * np.asarray(self.scales())[layer][:, None]

    def decoder_writes(self, layer, feature) -> Float[Array, "n L D"]:
        vec = self.stacked.W_dec[layer, feature] / self.stacked.act_scale[layer][:, None]  # [n, D]
        return vec[:, None, :] * (jnp.arange(self.n_layers)[None, :] == jnp.asarray(layer)[:, None])[..., None]

    def writes(self, layer, feature):
        """Host-side: one write per feature, into its own layer."""
        return np.arange(len(layer)), np.asarray(layer), np.asarray(self.stacked.W_dec)[layer, feature]

    def replaced_run(self, model, tokens, error=None, skip_first: int = 1, edits=None, interventions=()):
        s = self.stacked
        keep = (jnp.arange(tokens.shape[1]) < skip_first)[None]
        replace = ReplaceMLPs(s, error, keep, Where(), s.target, s.site, edits)
        out = forward(model, tokens, capture=(s.site, Capture("resid_post", layers=(self.n_layers - 1,))),
                      interventions=(*interventions, replace))
        return out.acts["resid_post"][0], out.acts[s.site]


@dataclass(frozen=True)
class TranscoderSet:
    """One transcoder per layer 0..L-1, all reading `site` and predicting `target` with one architecture and
    width; `stacked` holds them with a leading layer axis (the form the replacement model and attribution use)."""

    transcoders: tuple[SAE, ...]

    @classmethod
    def of(cls, transcoders: Iterable[SAE]) -> "TranscoderSet":
        tcs = sorted(transcoders, key=lambda t: -1 if t.layer is None else t.layer)
        if not tcs:
            raise InputError("TranscoderSet.of: no transcoders given")
        first = tcs[0]
        if first.target is None:
            raise InputError(f"TranscoderSet.of: {first.hook} is an SAE (no target), not a transcoder")
        layers = [t.layer for t in tcs]
        if layers != list(range(len(tcs))):
            raise InputError(f"TranscoderSet.of: need one transcoder for each layer 0..{len(tcs) - 1}, got layers {layers}")

        def shared(t):
            return t.arch, t.site, t.target, t.width, t.d_in, t.config().get("k"), t.W_skip is not None

        want = shared(first)
        for t in tcs:
            if (same := shared(t)) != want:
                raise InputError(f"TranscoderSet.of: layer {t.layer} is (arch, site, target, width, d_in, k, skip) = {same}, "
                                 f"layer 0 is {want}: a set shares them")
        return cls(tuple(tcs))

    @property
    def n_layers(self) -> int:
        return len(self.transcoders)

    @property
    def site(self) -> str:
        return self.transcoders[0].site

    @property
    def target(self) -> str:
        return self.transcoders[0].target

    @property
    def width(self) -> int:
        return self.transcoders[0].width

    @property
    def arch(self) -> str:
        return self.transcoders[0].arch

    @property
    def skip(self) -> bool:
        """Whether the transcoders are skip transcoders (`W_skip`)."""
        return self.transcoders[0].W_skip is not None

    @functools.cached_property
    def stacked(self) -> SAE:
        """The transcoders as one SAE pytree with arrays `[L, ...]` (static layer dropped; built once)."""
        plain = [dataclasses.replace(t, layer=None) for t in self.transcoders]
        return jax.tree.map(lambda *a: jnp.stack(a), *plain)

    @functools.cached_property
    def replacement(self) -> StackedTranscoders:
        """The set as the replacement interface (what attribution and feature effects take)."""
        return StackedTranscoders(self.stacked)

    def check(self, cfg) -> None:
        """InputError unless the set fits the model config: one transcoder per layer, widths the sites'."""
        if self.n_layers != cfg.n_layers:
            raise InputError(f"the transcoder set has {self.n_layers} layers, the model {cfg.n_layers}")
        for name in (self.site, self.target):
            if site_width(cfg, name) != self.transcoders[0].d_in:
                raise InputError(f"transcoders have d_in {self.transcoders[0].d_in}, the model's {name!r} has width "
                                 f"{site_width(cfg, name)}")

    def replace_mlps(self, error=None, keep=None, edits=None, n_pos: int | None = None) -> ReplaceMLPs:
        """The intervention replacing every layer's `target` by its transcoder (see `ReplaceMLPs`); `edits`
        (`saes.circuits.feature_effects.FeatureEdits`) clamp or ablate features on the way, checked against the set and
        the prompt length `n_pos` (required with them: a position past the prompt is an error, not dropped)."""
        if edits is not None:
            if n_pos is None:
                raise InputError("replace_mlps: edits need n_pos, the prompt length their positions are checked against")
            edits.check(self.n_layers, n_pos, self.width, 0)
        return ReplaceMLPs(self.stacked, error, keep, Where(), self.target, self.site, edits)

    def ce_metrics(self, model, tokens, mask=None) -> dict[str, float]:
        """Next-token CE clean, with every MLP replaced by its transcoder (the first token keeps its real
        output), and with every MLP zero-ablated; CE recovered, KL(clean || replaced) and KL(clean || zero)."""
        self.check(model.cfg)
        tokens = jnp.asarray(tokens)
        mask = jnp.ones_like(tokens) if mask is None else jnp.asarray(mask)
        first = jnp.cumsum(mask, 1) == 1
        replaced = forward(model, tokens, attention_mask=mask, interventions=(self.replace_mlps(keep=first),)).logits
        return replacement_ce(model, tokens, mask, replaced, self.target)



def random_set(cfg, arch: str = "relu", width: int = 40, *, seed: int = 0, bias: float = 0.05,
               act_scale: float | None = None, dec_scale: float = 1.0, k: int = 6, threshold: float = 0.02,
               site: str = "ln2.normalized", skip_scale: float | None = None) -> TranscoderSet:
    """Random transcoders `site -> mlp_out` for every layer of a model config (layer l seeded `seed + l`), with
    encoder bias `bias` (a positive bias makes many features fire), decoders scaled by `dec_scale`, and with
    `skip_scale` a random skip path `W_skip` of that spectral scale: for tests, benchmarks and trying the
    pipeline before training."""
    out = []
    for layer in range(cfg.n_layers):
        key = jax.random.key(seed + layer)
        t = sae_lib.init(arch, cfg.d_model, width, key, site=site, layer=layer, target="mlp_out", k=k,
                         threshold=threshold, skip=skip_scale is not None)
        t = eqx.tree_at(lambda t: (t.b_enc, t.W_dec), t, (bias * jnp.ones(width), dec_scale * t.W_dec))
        if skip_scale is not None:
            W = jax.random.normal(jax.random.fold_in(key, 1), (cfg.d_model, cfg.d_model)) / (2 * cfg.d_model**0.5)
            t = eqx.tree_at(lambda t: t.W_skip, t, skip_scale * W)
        if act_scale is not None:
            t = eqx.tree_at(lambda t: t.act_scale, t, jnp.asarray(act_scale, jnp.float32))
        out.append(t)
    return TranscoderSet.of(out)
