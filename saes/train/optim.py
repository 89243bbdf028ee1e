"""The optimizer of a run: optax Adam after global-norm clipping, with a linear learning-rate warm-up and a
linear decay over the last `lr_decay_frac` of the steps; and the sparsity coefficient's warm-up."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from saes.train.config import TrainConfig

__all__ = ["lr_schedule", "make_optimizer", "sparsity_schedule"]


def lr_schedule(cfg: TrainConfig):
    """The learning rate per step: linear warm-up, a flat stretch, then linear decay to 0 over `lr_decay_frac`."""
    steps = max(cfg.steps, 1)
    warm = min(cfg.lr_warmup_steps, steps)
    decay = int(cfg.lr_decay_frac * steps)
    flat = max(steps - warm - decay, 0)
    # warm-up: lr/warm at step 0 rising linearly to lr at step warm - 1; decay: linear to 0 at the last step
    parts = [optax.linear_schedule(cfg.lr / max(warm, 1), cfg.lr, max(warm - 1, 1)),
             optax.constant_schedule(cfg.lr),
             optax.linear_schedule(cfg.lr, 0.0, max(decay, 1))]
    return optax.join_schedules(parts, [max(warm, 1), max(warm, 1) + flat])


def make_optimizer(cfg: TrainConfig):
    """Adam on `lr_schedule(cfg)` after clipping the global gradient norm at `cfg.grad_clip`."""
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adam(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2))


def sparsity_schedule(cfg: TrainConfig, step):
    """The sparsity coefficient at `step`: `cfg.coeff` after a linear warm-up over `sparsity_warmup_frac`."""
    warm = cfg.sparsity_warmup_frac * cfg.steps
    if warm <= 0:
        return jnp.asarray(cfg.coeff, jnp.float32)
    return cfg.coeff * jnp.minimum(1.0, (step + 1) / warm)
