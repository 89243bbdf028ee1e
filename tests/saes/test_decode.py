"""The sparse TopK / BatchTopK path (`saes.core.sae.sparse_encode`, `sparse_decode`: slot loops with custom VJPs)
computes what the dense-gradient code it replaced computed: forward, every gradient, and training steps, to
float32 rounding (sums taken in another order). The replaced code is kept here as the reference."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saes.core import sae as sae_lib
from saes.train.synthetic import planted_source
from saes.train.loop import TrainConfig, calibrate, fresh_state, make_step


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """float32 matmuls at full precision on accelerators too (GPUs default to TF32), so tolerances hold."""
    with jax.default_matmul_precision("highest"):
        yield


def sq(err):
    """The reconstruction loss's form: mean over the batch of the squared error summed over d_in."""
    return jnp.mean(jnp.sum(jnp.square(err), -1))


def dense(vals, idx, width):
    """Dense [B, width] from [B, k] values at indices."""
    return jnp.zeros((vals.shape[0], width), vals.dtype).at[jnp.arange(vals.shape[0])[:, None], idx].set(vals)


def reference_decode(W_dec, vals, cols, rows, n_rows):
    """The decode before `sparse_decode`: TopK an einsum over the [B, k, d_in] gather of decoder rows,
    BatchTopK a segment sum of the gathered rows (here in the slot layout `sparse_decode` takes)."""
    if rows is None:
        return jnp.einsum("kb,kbd->bd", vals, jnp.take(W_dec, cols, axis=0))
    return jax.ops.segment_sum(vals.reshape(-1)[:, None] * jnp.take(W_dec, cols.reshape(-1), axis=0),
                               rows.reshape(-1), n_rows)


def reference_auxk(sae, pre, err, dead, aux_k):
    """AuxK before the sparse path: values (and gradients) taken from the dense pre-activations."""
    M = min(sae.width, max(4 * aux_k, 1024))

    def compute(_):
        _, cand = jax.lax.top_k(jnp.where(dead, pre.max(0), -jnp.inf), M)
        p = jnp.where(jnp.take(dead, cand), jnp.take(pre, cand, axis=1), -jnp.inf)
        vals, idx = jax.lax.top_k(p, min(aux_k, M))
        vals = jnp.where(jnp.isfinite(vals), jax.nn.relu(vals), 0.0)
        err_hat = dense(vals, idx, M) @ jnp.take(sae.W_dec, cand, axis=0)
        target = jax.lax.stop_gradient(err)
        return sq(target - err_hat) / jnp.maximum(sq(target - target.mean(0)), 1e-12)

    return jax.lax.cond(jnp.any(dead), jax.checkpoint(compute), lambda _: jnp.zeros((), pre.dtype), None)


def reference_topk_loss(self, xn, coeff, dead, aux_coeff=1 / 32, aux_k=0, aux_batch=0, yn=None):
    """TopK's loss before the sparse path: gradients through the dense pre-activations."""
    pre = self.pre_acts(xn)
    vals, idx = self.select(pre)
    x_hat = reference_decode(self.W_dec, vals.T, idx.T, None, xn.shape[0]) + self.b_dec
    recon = sq(xn - x_hat)
    n = aux_batch or xn.shape[0]
    auxk = reference_auxk(self, pre[:n], (xn - x_hat)[:n], dead, aux_k or self.d_in // 2) if aux_coeff else 0.0
    fires = jnp.zeros((self.width,), jnp.int32).at[idx.reshape(-1)].add((vals > 0).reshape(-1).astype(jnp.int32))
    l0 = (vals > 0).sum(-1).mean()
    return recon + aux_coeff * auxk, dict(recon=recon, sparsity=0.0, auxk=auxk, fires=fires, l0=l0, x_hat=x_hat)


def reference_batchtopk_loss(self, xn, coeff, dead, aux_coeff=1 / 32, aux_k=0, aux_batch=0, yn=None):
    """BatchTopK's loss before the sparse path."""
    B = xn.shape[0]
    pre = self.pre_acts(xn)
    vals, flat = self.select(pre)
    rows, cols = flat // self.width, flat % self.width
    x_hat = reference_decode(self.W_dec, *(a.reshape(self.k, B) for a in (vals, cols, rows)), B) + self.b_dec
    recon = sq(xn - x_hat)
    n = aux_batch or B
    auxk = reference_auxk(self, pre[:n], (xn - x_hat)[:n], dead, aux_k or self.d_in // 2) if aux_coeff else 0.0
    kept = vals > 0
    fires = jnp.zeros((self.width,), jnp.int32).at[cols].add(kept.astype(jnp.int32))
    min_kept = jnp.min(jnp.where(kept, vals, jnp.inf))
    return recon + aux_coeff * auxk, dict(recon=recon, sparsity=0.0, auxk=auxk, fires=fires,
                                          l0=kept.sum() / B, x_hat=x_hat, min_kept=min_kept)


REFERENCE_LOSS = {"topk": (sae_lib.TopKSAE, reference_topk_loss),
                  "batchtopk": (sae_lib.BatchTopKSAE, reference_batchtopk_loss)}


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

    # sparse_encode: the dense pre-activations x @ W_t.T at the entries, and their gradients
    x, gv = g, jax.random.normal(kw, vals.shape)

    def dense(W_t, x):
        pre = x @ W_t.T  # [B, W]
        return pre[jnp.arange(B)[None], cols] if rows is None else pre[rows, cols]

    outs = [(out, *vjp(gv)) for out, vjp in (jax.vjp(lambda W_t, x: sae_lib.sparse_encode(W_t, x, cols, rows), W_dec, x),
                                             jax.vjp(dense, W_dec, x))]
    for new, ref, name in zip(outs[0], outs[1], ("pre-activations", "d W_enc_t", "d x")):
        np.testing.assert_allclose(new, ref, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_training_steps_equal_the_reference_decode(arch, monkeypatch):
    """Four steps (AuxK on: latents go dead after 512 tokens) with the sparse path and with the reference
    loss swapped in: every metric (loss, EV, L0, AuxK, threshold, ...) and the final state agree."""
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
    cls, reference = REFERENCE_LOSS[arch]
    monkeypatch.setattr(cls, "loss", reference)
    ref_state, ref_hist = run()
    assert any(float(m["synthetic"]["auxk"]) > 0 for m in ref_hist)  # AuxK took part
    for a, b in zip(jax.tree.leaves(new_hist), jax.tree.leaves(ref_hist)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_loss_and_gradients_equal_the_reference(arch):
    """One batch with half the latents dead (AuxK on) and nonzero biases: the loss, every aux value and the
    gradient of every array equal the reference's."""
    sae = sae_lib.init(arch, 24, 96, jax.random.key(0), k=4)
    kb, ke, kx = jax.random.split(jax.random.key(1), 3)
    sae = eqx.tree_at(lambda m: (m.b_dec, m.b_enc), sae,
                      (0.3 * jax.random.normal(kb, (24,)), 0.1 * jax.random.normal(ke, (96,))))
    xn = jax.random.normal(kx, (128, 24))
    dead = jnp.arange(96) % 2 == 0
    reference = REFERENCE_LOSS[arch][1]
    (loss, aux), grads = jax.value_and_grad(lambda s: s.loss(xn, 0.0, dead, 1 / 32, 8, 64), has_aux=True)(sae)
    (ref_loss, ref_aux), ref_grads = jax.value_and_grad(lambda s: reference(s, xn, 0.0, dead, 1 / 32, 8, 64),
                                                        has_aux=True)(sae)
    assert float(aux["auxk"]) > 0
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for name in ref_aux:
        np.testing.assert_allclose(aux[name], ref_aux[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        g, r = getattr(grads, name), getattr(ref_grads, name)
        assert float(jnp.abs(r).max()) > 0, name
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * float(jnp.abs(r).max()), err_msg=name)
