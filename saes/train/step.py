"""The jitted training step, one for every hook's SAE on the same token batch, and the batch feeding.

Per step: each SAE's `loss` on its normalised batch (`xn = x * act_scale`; a transcoder's target `yn` is
normalised by the same factor), one optimizer over the dict of
SAEs (`saes.train.optim`), the decoder gradient's radial component projected out (`SAE.project_decoder_grad`),
then `constrain` and `update_buffers` on each SAE, firing statistics for dead/dense latents, and metrics. The
step is the same for every architecture: what differs is in the SAE classes (`saes.core.sae`).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from saes.train.optim import lr_schedule, make_optimizer, sparsity_schedule
from saes.train.config import TrainConfig
from saes.train.state import TrainState, batch_spec, state_specs, streams, trainable

__all__ = ["make_permute", "make_slice", "make_step"]


def make_step(cfg: TrainConfig, mesh: Mesh | None = None):
    """The jitted train step `(state, batch {hook: [B, d_in]}) -> (state, metrics)`; the state is donated.
    On a mesh the new state keeps the layout of `saes.train.state.state_specs`."""
    opt = make_optimizer(cfg)
    schedule = lr_schedule(cfg)
    alpha = 1.0 / max(cfg.freq_window_steps, 1)

    def step_fn(state: TrainState, batch: dict):
        saes = state.saes
        mask = trainable(saes)
        params, rest = eqx.partition(saes, mask)
        coeff = sparsity_schedule(cfg, state.step)
        dead = {h: state.since_fired[h] >= cfg.dead_tokens for h in saes}

        def loss_fn(params):
            models = eqx.combine(params, rest)
            total, aux = 0.0, {}
            for h, sae in models.items():
                x, y = streams(sae, h, batch)
                xn = x.astype(jnp.float32) * sae.act_scale
                yn = None if y is None else y.astype(jnp.float32) * sae.act_scale
                loss, a = sae.loss(xn, coeff, dead[h], cfg.aux_coeff, cfg.aux_k, cfg.aux_batch, yn=yn)
                a["xn"] = xn if yn is None else yn  # what the decoder reconstructs
                aux[h] = (loss, a)
                total = total + loss
            return total, aux

        (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads = {h: eqx.tree_at(lambda m: m.W_dec, g, saes[h].project_decoder_grad(g.W_dec)) for h, g in grads.items()}
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = opt.update(grads, state.opt_state, params)
        params = eqx.apply_updates(params, updates)
        new_saes = {h: s.constrain().update_buffers(aux[h][1], cfg.threshold_lr)
                    for h, s in eqx.combine(params, rest).items()}

        metrics = {"loss": total, "lr": schedule(state.step), "sparsity_coeff": coeff, "grad_norm": grad_norm}
        since, freq = {}, {}
        for h, sae in new_saes.items():
            loss, a = aux[h]
            B = a["xn"].shape[0]
            fires = a["fires"]
            since[h] = jnp.where(fires > 0, 0, jnp.minimum(state.since_fired[h] + B, 2**30))
            freq[h] = (1 - alpha) * state.freq[h] + alpha * fires.astype(jnp.float32) / B
            xn = a["xn"]
            err = jnp.sum(jnp.square(xn - a["x_hat"]))
            var = jnp.sum(jnp.square(xn - xn.mean(0)))
            fvu = err / var
            metrics[h] = {
                "loss": loss, "mse": err / xn.size, "fvu": fvu, "explained_variance": 1 - fvu, "l0": a["l0"],
                "sparsity": a["sparsity"], "auxk": a["auxk"],
                "dead_frac": jnp.mean(since[h] >= cfg.dead_tokens), "dense_frac": jnp.mean(freq[h] > cfg.dense_freq),
                **sae.train_metrics(),
            }

        finite = jnp.isfinite(total) & jnp.all(jnp.asarray(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(eqx.filter(new_saes, eqx.is_inexact_array))]))
        bad = jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
        new_state = TrainState(saes=new_saes, opt_state=opt_state, since_fired=since, freq=freq,
                               step=state.step + 1, bad_step=bad)
        if mesh is not None:
            new_state = jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s)),
                                     new_state, state_specs(new_state, mesh))
        return new_state, metrics

    return jax.jit(step_fn, donate_argnums=(0,))


def make_permute():
    """Jitted `(chunk {hook: [N, d_in]}, key) -> chunk` with its rows in one random order (the same for all hooks)."""
    @jax.jit
    def permute(chunk, key):
        n = next(iter(chunk.values())).shape[0]
        perm = jax.random.permutation(key, n)
        return {h: jnp.take(a, perm, axis=0) for h, a in chunk.items()}

    return permute


def make_slice(batch_size: int, mesh: Mesh | None):
    """Jitted `(chunk, j) -> batch j {hook: [batch_size, d_in]}`, split over the mesh's data axis."""
    def slice_(chunk, j):
        return {h: jax.lax.dynamic_slice_in_dim(a, j * batch_size, batch_size, 0) for h, a in chunk.items()}

    if mesh is None:
        return jax.jit(slice_)
    return jax.jit(slice_, out_shardings=NamedSharding(mesh, batch_spec(mesh)))
