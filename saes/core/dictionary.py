"""The bottom of `saes`: the abstract `Dictionary` every dictionary is (imports nothing else in `saes`).

A dictionary maps activations of `site` to features and back: `encode(x) -> f`, `decode(f) -> x_hat` (a
transcoder's: a prediction of `target`). The concrete, final classes are the SAE architectures of `saes.core.sae`
(one per `arch`, joining `saes.core.sae.ARCHS` with `@register_arch`) and `saes.core.cross_layer.CrossLayerTranscoder`;
the trainer (`saes.train.step`, `saes.train.state`) and the file formats speak only this interface:

| member                      | what                                                                                |
|-----------------------------|-------------------------------------------------------------------------------------|
| `site`, `target`            | the input site; the site a transcoder predicts (None: an SAE)                       |
| `d_in`, `width`             | the input width and the number of features (per layer for a CLT)                    |
| `latent_shape`              | the shape of per-latent statistics (`[width]`; a CLT's `[L, width]`)                |
| `hook`                      | its key in a training run                                                           |
| `axes`, `buffers`           | logical axes of each array (`models.sharding.RULES`), arrays the optimizer skips    |
| `encode`, `decode`          | raw activations -> features -> reconstruction (raw scale)                           |
| `streams(batch, hook)`      | its input and target from a batch of named streams                                  |
| `loss`, `constrain`, ...    | training: `(loss, aux)` on normalised inputs; constraints after each step           |
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array

from models.errors import InputError
from models.sites import check_site

__all__ = ["Dictionary", "Replacement", "site_width", "trainable_arrays"]


class Dictionary(eqx.Module):
    """The abstract dictionary (see the module docstring); concrete subclasses are final."""

    site: eqx.AbstractVar[str]
    target: eqx.AbstractVar[str | None]
    W_enc: eqx.AbstractVar[Array]
    W_dec: eqx.AbstractVar[Array]
    act_scale: eqx.AbstractVar[Array]

    buffers: ClassVar[tuple[str, ...]] = ("act_scale",)  # arrays that the optimizer never touches
    axes: eqx.AbstractClassVar[dict[str, tuple[str | None, ...]]]

    @property
    @abc.abstractmethod
    def d_in(self) -> int: ...

    @property
    @abc.abstractmethod
    def width(self) -> int: ...

    @property
    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """The shape of per-latent statistics."""

    @property
    @abc.abstractmethod
    def hook(self) -> str:
        """Its key in a training run (and its directory under `saes/`)."""

    @abc.abstractmethod
    def encode(self, x):
        """Feature activations of raw activations."""

    @abc.abstractmethod
    def decode(self, f):
        """The features' reconstruction (a transcoder's: prediction of its target), raw scale."""

    def __call__(self, x):
        return self.decode(self.encode(x))

    @abc.abstractmethod
    def streams(self, batch: dict, hook: str) -> tuple[Array, Array | None]:
        """`(x, y)`: its input and target (None: an SAE) from a batch of named streams `{hook: [N, d_in]}`."""

    # -- training (`saes.train.step`)
    @abc.abstractmethod
    def loss(self, xn, coeff, dead, aux_coeff: float = 0.0, aux_k: int = 0, aux_batch: int = 0, yn=None):
        """`(loss, aux)` on a normalised batch (see the concrete classes for `aux`)."""

    @abc.abstractmethod
    def constrain(self) -> "Dictionary":
        """Re-impose the architecture's constraints after an optimizer step."""

    @abc.abstractmethod
    def fold_scale(self) -> "Dictionary":
        """The same function of raw activations with `act_scale` baked into the weights."""

    @abc.abstractmethod
    def config(self) -> dict:
        """Static, JSON-able description."""

    def trainable(self):
        """A pytree of bools like `self`: True on arrays the optimizer updates."""
        return trainable_arrays(self)

    def project_decoder_grad(self, grad_W_dec):
        """The decoder gradient with what the constraint forbids removed (default: unchanged)."""
        return grad_W_dec

    def update_buffers(self, aux: dict, threshold_lr: float) -> "Dictionary":
        """Buffers estimated from a training batch's `loss` aux (BatchTopK's inference threshold); else self."""
        return self

    def train_metrics(self) -> dict:
        """Architecture-specific scalars logged after each step (BatchTopK: its threshold)."""
        return {}


class Replacement(eqx.Module):
    """The replacement interface: what the replacement model, attribution graphs (`saes.circuits.attribution`) and
    feature interventions (`saes.circuits.feature_effects`) ask of MLP replacements, so they never ask which kind they
    have. Implemented by a per-layer transcoder set (`saes.core.transcoders.StackedTranscoders`, what
    `TranscoderSet.replacement` gives) and by a cross-layer transcoder (`CrossLayerTranscoder.replacement` is
    itself). Arrays are layer-leading: inputs `[L, ..., D]`, features `[L, ..., W]`; a feature is
    (layer, index), and writes into the targets (MLP outputs) of its layer (a set) or of its layer and every
    later one (a CLT)."""

    @property
    @abc.abstractmethod
    def n_layers(self) -> int: ...

    @property
    def skip_weights(self) -> Array | None:
        """A skip transcoder set's linear paths `W_skip [L, D, D]` (stay live in the frozen model); else None."""
        return None

    @abc.abstractmethod
    def scales(self) -> Array:
        """Each layer's input scale `[L]` (`act_scale`)."""

    @abc.abstractmethod
    def pre_acts_layers(self, x):
        """Pre-activations `[L, ..., W]` of every layer's raw input `[L, ..., D]`."""

    @abc.abstractmethod
    def encode_layers(self, x):
        """Feature activations `[L, ..., W]` of every layer's raw input `[L, ..., D]`."""

    @abc.abstractmethod
    def predict_layers(self, acts, x):
        """Every layer's predicted target `[L, ..., D]` from the features `[L, ..., W]` (of that layer; a CLT's:
        and of earlier ones) and the raw inputs `x [L, ..., D]` (a skip path's)."""

    @abc.abstractmethod
    def encoder_rows(self, layer, feature):
        """d pre-activation / d raw input of features (`layer`, `feature`: `[n]` arrays): `[n, D]`."""

    @abc.abstractmethod
    def decoder_writes(self, layer, feature):
        """Raw-scale decoder vectors of features (`[n]` arrays) into every target layer `[n, L, D]` (zero where
        a feature does not write)."""

    @abc.abstractmethod
    def writes(self, layer, feature) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Host-side, one entry per (feature, target layer) it writes to: `(owner [E], target layer [E], decoder
        vector [E, D])` (normalised scale: divide by the target's scale), ordered by feature, then target."""

    @abc.abstractmethod
    def replaced_run(self, model, tokens, error=None, skip_first: int = 1, edits=None, interventions=()):
        """The forward of unpadded `tokens [B, T]` with every MLP output replaced (plus `error [L, B, T, D]`
        when given; positions < `skip_first` keep their real output; `edits` set features; `interventions`
        run in every layer): `(the last layer's resid_post [B, T, D], every layer's input [L, B, T, D])`."""


def trainable_arrays(module):
    """A pytree of bools like `module` (a `Dictionary`): True on its array fields that are not among its
    `buffers` (what the optimizer updates)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: eqx.is_array(leaf) and path[0].name not in module.buffers, module)


def site_width(cfg, site: str) -> int:
    """Width of one token's activation at `site` for a `models.Config` (per-head sites flattened: H * d)."""
    axes = check_site(site).axes
    if "kv_seq" in axes:
        raise InputError(f"site {site!r} (attention scores/patterns) has no fixed width for an SAE")
    size = dict(embed=cfg.d_model, heads=cfg.n_heads, kv_heads=cfg.n_kv_heads, head_dim=cfg.d_head, mlp=cfg.d_mlp)
    return int(np.prod([size[a] for a in axes[2:]]))
