"""The slot-loop sparse decode (`saes.sae.sparse_decode`) computes what the one-shot gather decode it replaced
computed: forward, both gradients, and TopK / BatchTopK training steps, to float32 rounding (sums taken in
another order)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saes import sae as sae_lib
from saes.synthetic import planted_source
from saes.train import TrainConfig, calibrate, fresh_state, make_step


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """float32 matmuls at full precision on accelerators too (GPUs default to TF32), so tolerances hold."""
    with jax.default_matmul_precision("highest"):
        yield


def reference_decode(W_dec, vals, cols, rows, n_rows):
    """The decode before `sparse_decode`: TopK an einsum over the [B, k, d_in] gather of decoder rows,
    BatchTopK a segment sum of the gathered rows (here in the slot layout `sparse_decode` takes)."""
    if rows is None:
        return jnp.einsum("kb,kbd->bd", vals, jnp.take(W_dec, cols, axis=0))
    return jax.ops.segment_sum(vals.reshape(-1)[:, None] * jnp.take(W_dec, cols.reshape(-1), axis=0),
                               rows.reshape(-1), n_rows)


@pytest.mark.parametrize("layout", ["per_token", "flat"])
def test_sparse_decode_and_its_gradients_equal_the_reference(layout):
    B, d, W, k = 48, 24, 96, 5
    kw, kp, kg = jax.random.split(jax.random.key(0), 3)
    W_dec = jax.random.normal(kw, (W, d))
    pre = jax.random.normal(kp, (B, W))
    if layout == "per_token":  # TopK: slot j holds every token's j-th latent
        vals, idx = jax.lax.top_k(pre, k)
        vals, cols, rows = jax.nn.relu(vals).T, idx.T, None
    else:  # BatchTopK: k * B entries anywhere in the batch, rows repeated or absent
        pre = pre.at[:4].set(-10.0)  # rows 0-3 get no entry
        vals, flat = jax.lax.top_k(pre.reshape(-1), k * B)
        vals, cols, rows = (a.reshape(k, B) for a in (jax.nn.relu(vals), flat % W, flat // W))
        counts = np.bincount(np.asarray(rows).ravel(), minlength=B)
        assert counts[:4].max() == 0 and counts.max() > k  # some rows get no entry, others more than k
    g = jax.random.normal(kg, (B, d))
    outs = []
    for decode in (sae_lib.sparse_decode, reference_decode):
        out, vjp = jax.vjp(lambda Wd, v: decode(Wd, v, cols, rows, B), W_dec, vals)
        outs.append((out, *vjp(g)))
    for new, ref, name in zip(outs[0], outs[1], ("output", "d W_dec", "d vals")):
        np.testing.assert_allclose(new, ref, rtol=1e-5, atol=1e-5, err_msg=name)
    jitted = jax.jit(lambda Wd, v: sae_lib.sparse_decode(Wd, v, cols, rows, B))
    np.testing.assert_allclose(jitted(W_dec, vals), outs[1][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_training_steps_equal_the_reference_decode(arch, monkeypatch):
    """Four steps (AuxK on: latents go dead after 512 tokens) with the new decode and with the reference
    swapped in: every metric (loss, EV, L0, AuxK, threshold, ...) and the final state agree."""
    src, _ = planted_source(d_in=16, n_atoms=32, chunk_tokens=2048, seed=0)
    cfg = TrainConfig(arch=arch, width=64, k=3, tokens=256 * 4, batch_size=256, chunk_tokens=2048, lr=3e-3,
                      lr_warmup_steps=1, dead_tokens=512, progress=False, out="/unused")
    chunk, _ = next(src.chunks(0))
    start = calibrate(fresh_state(cfg, {"synthetic": ("x", None, 16)}, jax.random.key(0)), chunk, cfg)

    def run():
        step_fn, state, history = make_step(cfg), jax.tree.map(jnp.array, start), []  # (the step donates)
        for j in range(4):
            state, m = step_fn(state, {"synthetic": chunk["synthetic"][j * 256:(j + 1) * 256]})
            history.append(jax.device_get(m))
        return state, history

    new_state, new_hist = run()
    monkeypatch.setattr(sae_lib, "sparse_decode", reference_decode)
    ref_state, ref_hist = run()
    assert any(float(m["synthetic"]["auxk"]) > 0 for m in ref_hist)  # AuxK took part
    for a, b in zip(jax.tree.leaves(new_hist), jax.tree.leaves(ref_hist)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
