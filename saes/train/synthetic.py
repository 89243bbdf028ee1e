"""Synthetic activations with a planted sparse dictionary (tests, demos) and the recovery metric."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from saes.train.data import ArraySource

__all__ = ["planted_source", "recovery"]


def planted_source(d_in: int = 32, n_atoms: int = 64, p_active: float = 0.05, chunk_tokens: int = 16384,
                   seed: int = 0, hook: str = "synthetic", noise: float = 0.0, offset: float = 1.0):
    """An `ArraySource` of x = sum_i c_i a_i + offset vector (+ noise): `n_atoms` random unit atoms `a_i`,
    each active independently with probability `p_active`, magnitudes uniform in [0.5, 1.5]. Returns
    (source, atoms [n_atoms, d_in])."""
    key = jax.random.key(seed)
    ka, kb = jax.random.split(key)
    atoms = jax.random.normal(ka, (n_atoms, d_in))
    atoms = atoms / jnp.linalg.norm(atoms, axis=-1, keepdims=True)
    bias = offset * jax.random.normal(kb, (d_in,)) / np.sqrt(d_in)

    @partial(jax.jit, static_argnums=0)
    def make(n, k):
        k1, k2, k3 = jax.random.split(k, 3)
        on = jax.random.bernoulli(k1, p_active, (n, n_atoms))
        mag = jax.random.uniform(k2, (n, n_atoms), minval=0.5, maxval=1.5)
        x = (on * mag) @ atoms + bias
        return x + noise * jax.random.normal(k3, x.shape)

    src = ArraySource(lambda i: {hook: make(chunk_tokens, jax.random.fold_in(jax.random.key(seed + 1), i))},
                      (hook,), {hook: d_in}, meta=dict(synthetic=True, d_in=d_in, n_atoms=n_atoms, p_active=p_active))
    return src, np.asarray(atoms)


def recovery(W_dec, atoms, threshold: float = 0.9) -> float:
    """Fraction of true atoms whose best-matching decoder row has cosine similarity >= `threshold`."""
    W = np.asarray(W_dec, np.float64)
    W = W / np.maximum(np.linalg.norm(W, axis=-1, keepdims=True), 1e-12)
    A = np.asarray(atoms, np.float64)
    A = A / np.linalg.norm(A, axis=-1, keepdims=True)
    best = (A @ W.T).max(-1)
    return float((best >= threshold).mean())
