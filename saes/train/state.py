"""What a training step changes (`TrainState`), a fresh or calibrated one, and its placement on a mesh.

Sharding: with `data_parallel * feature_parallel` devices, a `("data", "model")` mesh splits each batch over
`data` and every SAE's dictionary over `model`. Each SAE class declares the logical axes of its arrays
(`SAE.axes`: `W_enc` ("embed", "features"), `W_dec` ("features", "embed"), per-feature vectors
("features",)); `models.sharding.RULES` maps them to mesh axes ("features" -> model, "embed" replicated),
for the SAEs, their Adam moments and the per-latent statistics alike. The same config runs on one CPU or a
mesh.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from models.errors import InputError
from models.sharding import partition_spec, put, sweep_mesh
from saes.core import cross_layer, sae as sae_lib
from saes.core.dictionary import Dictionary
from saes.train.optim import make_optimizer
from saes.train.config import TrainConfig

__all__ = ["Dictionary", "TrainState", "abstract_state", "batch_spec", "calibrate", "fresh_state", "geometric_median",
           "make_mesh", "place_state", "state_specs", "streams", "trainable"]

# what a run trains (`saes.core.dictionary.Dictionary`): an SAE/transcoder per hook, or one CLT for all layers


class TrainState(eqx.Module):
    """Everything a step changes: the SAEs, the optimizer state, per-feature statistics, the step, and
    the first step at which anything became non-finite (-1: none)."""

    saes: dict[str, Dictionary]
    opt_state: Any
    since_fired: dict[str, jax.Array]  # tokens since each latent last fired
    freq: dict[str, jax.Array]  # moving average of each latent's firing frequency
    step: jax.Array
    bad_step: jax.Array


def streams(sae: Dictionary, hook: str, batch: dict) -> tuple[jax.Array, jax.Array | None]:
    """`(x, y)`: a dictionary's input and target (None: an SAE) from a batch or chunk of named streams
    `{hook: [N, d_in]}`; a CLT's are every layer's, stacked `[N, L, d_in]`."""
    return sae.streams(batch, hook)


def trainable(saes: dict[str, Dictionary]) -> dict[str, Dictionary]:
    """`{hook: SAE-shaped pytree of bools}`: True on the arrays the optimizer updates."""
    return {h: s.trainable() for h, s in saes.items()}


def fresh_state(cfg: TrainConfig, hooks: dict[str, tuple[str, int | None, int]], key) -> TrainState:
    """A state with freshly initialised SAEs (act_scale 1, b_dec 0) for `{hook: (site, layer, d_in)}`; with
    `cfg.cross_layer`, one CLT over those hooks (every layer of one site)."""
    if cfg.cross_layer:
        clt = _fresh_clt(cfg, hooks, key)
        saes = {clt.hook: clt}
    else:
        saes = {hook: sae_lib.init(cfg.arch, d_in, cfg.width, jax.random.fold_in(key, i), site=site, layer=layer,
                                   k=cfg.k, bandwidth=cfg.bandwidth, threshold=cfg.threshold_init,
                                   decoder_norm=cfg.decoder_init_norm, target=cfg.target, skip=cfg.skip)
                for i, (hook, (site, layer, d_in)) in enumerate(sorted(hooks.items()))}
    opt = make_optimizer(cfg)
    params = eqx.filter(saes, trainable(saes))
    return TrainState(
        saes=saes, opt_state=opt.init(params),
        since_fired={h: jnp.zeros(s.latent_shape, jnp.int32) for h, s in saes.items()},
        freq={h: jnp.zeros(s.latent_shape, jnp.float32) for h, s in saes.items()},
        step=jnp.zeros((), jnp.int32), bad_step=jnp.full((), -1, jnp.int32),
    )


def _fresh_clt(cfg: TrainConfig, hooks: dict[str, tuple[str, int | None, int]], key) -> cross_layer.CrossLayerTranscoder:
    """One cross-layer transcoder over hooks that are every layer 0..n-1 of one site."""
    sites = {(site, d_in) for site, _, d_in in hooks.values()}
    layers = sorted(layer for _, layer, _ in hooks.values())
    if len(sites) != 1 or layers != list(range(len(hooks))):
        raise InputError(f"a cross-layer transcoder reads every layer 0..n-1 of one site; the hooks are {sorted(hooks)}")
    (site, d_in), = sites
    return cross_layer.init(cfg.arch, len(hooks), d_in, cfg.width, key, site=site, target=cfg.target, k=cfg.k,
                            bandwidth=cfg.bandwidth, threshold=cfg.threshold_init, decoder_norm=cfg.decoder_init_norm)


def geometric_median(x, iters: int = 30, eps: float = 1e-6):
    """Weiszfeld's algorithm for the geometric median of rows of `x` (starting from the mean)."""

    def body(_, m):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - m, axis=-1), eps)
        return (w[:, None] * x).sum(0) / w.sum()

    return jax.lax.fori_loop(0, iters, body, x.mean(0))


def calibrate(state: TrainState, chunk: dict, cfg: TrainConfig) -> TrainState:
    """Set each dictionary's `act_scale` (mean norm of its input -> sqrt(d_in); a CLT: per layer) and `b_dec`
    (geometric median / mean of the normalised data: a transcoder's target) from the first chunk."""
    saes = dict(state.saes)
    for hook, sae in saes.items():
        x, y = streams(sae, hook, chunk)
        n = min(x.shape[0], 16384)
        x = jnp.asarray(x[:n], jnp.float32)
        scale = (jnp.sqrt(sae.d_in) / jnp.mean(jnp.linalg.norm(x, axis=-1), 0) if cfg.normalize
                 else jnp.ones(x.shape[1:-1]))
        scale = scale.reshape(sae.act_scale.shape)
        xn = (x if y is None else jnp.asarray(y[:n], jnp.float32)) * scale
        if cfg.b_dec_init == "geometric_median":
            b = geometric_median(xn) if xn.ndim == 2 else jax.vmap(geometric_median, in_axes=1)(xn)
        elif cfg.b_dec_init == "mean":
            b = xn.mean(0)
        else:
            b = jnp.zeros(xn.shape[1:])
        saes[hook] = eqx.tree_at(lambda m: (m.act_scale, m.b_dec), sae,
                                 (scale.astype(jnp.float32), b.astype(sae.b_dec.dtype)))
    return eqx.tree_at(lambda s: s.saes, state, saes)


def make_mesh(cfg: TrainConfig) -> Mesh | None:
    """The ("data", "model") mesh of the config, or None on a single device."""
    n = len(jax.devices())
    fp = max(cfg.feature_parallel, 1)
    dp = cfg.data_parallel or n // fp
    if dp * fp == 1:
        return None
    if dp * fp > n:
        raise InputError(f"data_parallel {dp} x feature_parallel {fp} needs {dp * fp} devices, have {n}")
    return sweep_mesh(jax.devices()[: dp * fp], model=fp)


def sae_specs(sae: Dictionary, mesh: Mesh) -> Dictionary:
    """An SAE-shaped pytree (an SAE, or its gradient / Adam moment with None off the trainable arrays) of the
    PartitionSpecs its class's declared `axes` give on `mesh` (an axis whose size the mesh axis does not
    divide is replicated)."""
    axes = type(sae).axes
    return jax.tree_util.tree_map_with_path(lambda path, x: partition_spec(axes[path[0].name], x.shape, mesh), sae)


def state_specs(state: TrainState, mesh: Mesh | None) -> TrainState:
    """A TrainState of PartitionSpecs: the SAEs and every SAE-shaped part of the optimizer state by the
    declared axes (`sae_specs`), the per-latent statistics as ("features",) (a CLT's `[L, W]`: ("layers", "features")),
    everything else replicated."""
    if mesh is None:
        return jax.tree.map(lambda _: P(), state)
    by_axes = lambda x: sae_specs(x, mesh) if isinstance(x, Dictionary) else P()  # noqa: E731
    per_latent = {h: partition_spec(("layers",) * (x.ndim - 1) + ("features",), x.shape, mesh)
                  for h, x in state.freq.items()}
    return TrainState(saes={h: sae_specs(s, mesh) for h, s in state.saes.items()},
                      opt_state=jax.tree.map(by_axes, state.opt_state, is_leaf=lambda x: isinstance(x, Dictionary)),
                      since_fired=per_latent, freq=dict(per_latent), step=P(), bad_step=P())


def place_state(state: TrainState, mesh: Mesh | None) -> TrainState:
    """The state's arrays put on `mesh` by `state_specs` (unchanged without a mesh); multi-process safe."""
    if mesh is None:
        return state
    return jax.tree.map(lambda x, s: put(x, mesh, s), state, state_specs(state, mesh))


def abstract_state(state: TrainState, mesh: Mesh | None) -> TrainState:
    """`jax.ShapeDtypeStruct`s with the shardings `place_state` gives (restore targets for checkpoints)."""
    specs = state_specs(state, mesh)

    def to_abstract(x, s):
        sharding = NamedSharding(mesh, s) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(to_abstract, state, specs)


def batch_spec(mesh: Mesh | None) -> P:
    """The PartitionSpec of a [B, d_in] batch: logical axes ("batch", "embed") resolved by
    `models.sharding.partition_spec` (the batch over the data axis with the default rules)."""
    return P(None, None) if mesh is None else partition_spec(("batch", "embed"), None, mesh)
