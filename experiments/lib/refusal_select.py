"""Arditi et al.'s refusal-direction selection, shared by `experiments.refusal_direction` (its study) and
`experiments.guiding_giants` (its "arditi" direction), so that no study imports another.

    sel = select_direction(m, SelectSpec(layer_stride=2), harmful_splits, harmless_splits, RefusalScore(ids))
    sel["direction"], sel["layer"], sel["position"]     # the choice; sel["bypass"], ... the [layer, position] grids
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import chat_batch
from experiments.lib.refusal_metrics import KLFromBase
from interp.directions import diff_of_means, score_directions
from interp.interventions import RESID_SITES, AlongDirection
from interp.positions import PostInstruction
from interp.readout import run_readout
from interp.sweeps import baseline, sweep

__all__ = ["SelectSpec", "select_direction"]


@dataclass(frozen=True)
class SelectSpec:
    """The selection's settings (the defaults are `experiments.refusal_direction.Config`'s)."""

    system_prompt: str = ""  # prepended as a system message ("" = none)
    layer_stride: int = 1  # score every k-th layer's candidates (1 = all)
    sweep_batch: int = 16  # candidates per vmapped chunk (memory)
    kl_threshold: float = 0.1  # candidates whose ablation moves harmless KL more are filtered out
    max_layer_fraction: float = 0.8  # candidates only from layers below this fraction of the depth


def select_direction(m, cfg: SelectSpec, harmful, harmless, metric):
    """Score every (layer, post-instruction position) candidate; returns the choice and the score grids. `cfg`: a
    `SelectSpec` or any config with its fields (`experiments.refusal_direction.Config` has them)."""
    system = cfg.system_prompt or None
    a, b = chat_batch(m, harmful[0], system), chat_batch(m, harmless[0], system)
    cands = diff_of_means(m, a, b, PostInstruction(), "resid_pre")  # [L, P, D]
    L, P, D = cands.shape
    layers = np.arange(0, L, cfg.layer_stride)
    dirs = cands[layers].reshape(-1, D)
    cand_layers = np.repeat(layers, P)
    harm_val, harmless_val = chat_batch(m, harmful[1], system), chat_batch(m, harmless[1], system)
    bypass, induce = score_directions(m, dirs, cand_layers, metric, harm_val, harmless_val, batch_size=cfg.sweep_batch)
    base_logp = jax.nn.log_softmax(run_readout(m, *map(jnp.asarray, harmless_val)).logits[:, -1], -1)
    n = len(dirs)
    zeros = jnp.zeros(n)
    kl = sweep(m, *harmless_val, KLFromBase(base_logp), tuple(AlongDirection(s, dirs, zeros, zeros) for s in RESID_SITES),
               first=np.zeros(n, np.int64), batch_size=cfg.sweep_batch)
    base_harm = baseline(m, *harm_val, metric)
    base_harmless = baseline(m, *harmless_val, metric)
    # a candidate that is (numerically) zero, e.g. layer 0 at template tokens identical in every prompt, is no direction
    norms = np.asarray(jnp.linalg.norm(dirs, axis=-1))
    usable = (norms > 1e-3 * norms.max()) & (cand_layers < cfg.max_layer_fraction * L) & np.isfinite(bypass)
    ok = usable & (kl < cfg.kl_threshold) & (induce > base_harmless)
    relaxed = not ok.any()
    pool = np.nonzero(ok if not relaxed else usable)[0]
    best = int(pool[np.argmin(bypass[pool])])
    grid = lambda v: v.reshape(len(layers), P)
    return dict(direction=dirs[best], layer=int(cand_layers[best]), position=int(best % P) - P, index=best,
                undefined=grid(norms <= 1e-3 * norms.max()),
                layers=layers, bypass=grid(bypass), induce=grid(induce), kl=grid(kl), n_pass=int(ok.sum()),
                relaxed=relaxed, base_harmful=base_harm, base_harmless=base_harmless)
