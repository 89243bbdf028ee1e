"""A seeded, jittable two-armed Gaussian bandit, the policy statistics of EAST (Rahn et al. 2024) and its vectors.

    env = make_bandits(jax.random.PRNGKey(0), n=16, steps=10, gap=5.0, sigma=10.0)   # 16 episodes x 10 steps
    r = pull(env, actions, t)                                                       # [E] rewards at step t
    u = east_vector(z, h)                                                           # [D] from z [K, T, D], h [K, T]

Every episode's reward noise is drawn up front (`noise [E, T, 2]`), so two policies run on the same episodes see
the same rewards for the same choices (common random numbers: conditions differ only by what they choose).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from models.errors import InputError


class Bandits(NamedTuple):
    """`E` two-armed bandits: arm means `[E, 2]`, standard-normal reward noise `[E, T, 2]`, reward sd `sigma`."""

    means: Float[Array, "E 2"]
    noise: Float[Array, "E T 2"]
    sigma: float


def make_bandits(key, n: int, steps: int, gap: float = 5.0, sigma: float = 10.0, base: float = 10.0) -> Bandits:
    """`n` bandits whose arms have means `base` and `base + gap`, the better arm chosen at random per episode."""
    if n < 1 or steps < 1:
        raise InputError(f"make_bandits needs n >= 1 and steps >= 1, got n={n}, steps={steps}")
    if sigma < 0:
        raise InputError(f"sigma must be >= 0, got {sigma}")
    k1, k2 = jax.random.split(key)
    better = jax.random.bernoulli(k1, 0.5, (n,)).astype(jnp.int32)
    means = base + gap * jax.nn.one_hot(better, 2)
    return Bandits(means, jax.random.normal(k2, (n, steps, 2)), float(sigma))


@jax.jit
def pull(env: Bandits, actions: Int[Array, " E"], t) -> Float[Array, " E"]:
    """Rewards of pressing arm `actions[e]` (0 or 1) at step `t` in each episode."""
    e = jnp.arange(env.means.shape[0])
    return env.means[e, actions] + env.sigma * env.noise[e, t, actions]


def entropy(p: Float[ArrayLike, "... A"]) -> Float[Array, "..."]:
    """`-sum_a p log p` in nats (0 log 0 = 0)."""
    p = jnp.asarray(p, jnp.float32)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)


def regret(env: Bandits, actions: Int[Array, "E T"]) -> Float[Array, "E T"]:
    """Cumulative expected regret: `sum_{s <= t} (max_a mean_a - mean_{a_s})`."""
    gap = jnp.max(env.means, 1, keepdims=True) - jnp.take_along_axis(env.means, actions, 1)
    return jnp.cumsum(gap, 1)


def tried_both(actions: Int[Array, "E T"], k: int) -> Float[Array, " E"]:
    """1 where an episode pressed both arms within its first `k` steps."""
    if not 1 <= k <= actions.shape[1]:
        raise InputError(f"k={k} out of range: episodes have {actions.shape[1]} steps (valid 1..{actions.shape[1]})")
    a = actions[:, :k]
    return (jnp.any(a == 0, 1) & jnp.any(a == 1, 1)).astype(jnp.float32)


def east_vector(z: Float[ArrayLike, "K T D"], h: Float[ArrayLike, "K T"]) -> Float[Array, " D"]:
    """The EAST direction `u = sum_k sum_t h_t^k (z_t^k - mean_t' z_t'^k) / sum_k sum_t h_t^k` (Z = sum of h)."""
    z, h = jnp.asarray(z, jnp.float32), jnp.asarray(h, jnp.float32)
    total = jnp.sum(h)
    if float(total) <= 0:
        raise InputError("east_vector: every entropy is 0 (a deterministic policy everywhere); the vector is undefined")
    centred = z - jnp.mean(z, 1, keepdims=True)
    return jnp.einsum("kt,ktd->d", h, centred) / total


def step_index_vector(z: Float[ArrayLike, "K T D"]) -> Float[Array, " D"]:
    """The "early in the episode" control: `sum_k sum_t (tbar - t)(z_t^k - zbar^k) / sum_k sum_t |tbar - t|`."""
    z = jnp.asarray(z, jnp.float32)
    K, T = z.shape[:2]
    if T < 2:
        raise InputError(f"step_index_vector needs at least 2 steps per episode, got {T}")
    w = jnp.broadcast_to((T - 1) / 2 - jnp.arange(T, dtype=jnp.float32), (K, T))
    centred = z - jnp.mean(z, 1, keepdims=True)
    return jnp.einsum("kt,ktd->d", w, centred) / jnp.sum(jnp.abs(w))
