"""Downstream evaluation: splice an SAE into the forward and measure the CE loss recovered and the KL.

    iv = Splice(sae)                                   # an interp.interventions.Intervention
    logits, _ = models.forward(m, tokens, mask, interventions=(iv,))
    ce_metrics(m, {"L10.resid_post": sae}, tokens, mask)
    # {"L10.resid_post": {"ce_clean", "ce_sae", "ce_zero", "ce_recovered", "kl"}}

CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), where CE_zero zero-ablates the site at the
SAE's layer. Splicing touches real tokens after the first (position id > 0, attention mask 1): the BOS
position, which SAEs are not trained on, keeps its true activation.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp

from interp.interventions import Intervention, StackedWhere, Where, at
from models.model import forward
from saes.core.sae import SAE

__all__ = ["Splice", "ce_and_kl", "ce_metrics", "next_token_ce", "real_positions", "reconstruction_metrics",
           "replacement_ce"]


def real_positions(ctx):
    """[B, T] bool: real tokens other than the first of each row."""
    return (ctx.attention_mask > 0) & (ctx.positions > 0)


class Splice(Intervention):
    """Replace the activation at the SAE's (site, layer) by its reconstruction (`mode="sae"`), by zeros
    (`"zero"`), or by the reconstruction plus the SAE's error (`"sae+error"`, identity up to rounding).
    A transcoder is spliced at its target (`mlp_out`), predicting it from its input site's value in the same
    layer (`SiteContext.seen`), so "sae" replaces the MLP by the transcoder and "zero" ablates the MLP.

    An ordinary intervention whose layer selection and mode are arrays (a `StackedWhere` item and two weights),
    not static fields, so every hook and mode of one SAE shape shares a single compiled forward; the SAE is
    evaluated at its layer only."""

    sae: SAE
    recon_weight: jax.Array
    error_weight: jax.Array
    where: StackedWhere
    site: str = eqx.field(static=True)
    source: str | None = eqx.field(static=True)  # a transcoder's input site (read from ctx.seen); None: the site

    def __init__(self, sae: SAE, mode: str = "sae", site: str | None = None, layer: int | None = None):
        weights = {"sae": (1.0, 0.0), "zero": (0.0, 0.0), "sae+error": (1.0, 1.0)}
        if mode not in weights:
            raise ValueError(f"mode must be 'sae', 'zero' or 'sae+error', got {mode!r}")
        self.site = site if site is not None else (sae.target or sae.site)
        self.source = sae.site if sae.target else None
        self.where = StackedWhere.of(at(self.site, layer if layer is not None else sae.layer))
        self.sae = dataclasses.replace(sae, site="", layer=None)  # static metadata out of the compiled signature
        self.recon_weight, self.error_weight = (jnp.asarray(w, jnp.float32) for w in weights[mode])

    def edit(self, value, ctx):
        B, T = value.shape[:2]
        x = value.reshape(B, T, -1).astype(jnp.float32)
        x_hat = self.sae(x if self.source is None else ctx.seen[self.source].reshape(B, T, -1).astype(jnp.float32))
        new = self.recon_weight * x_hat + self.error_weight * (x - x_hat)
        return jnp.where(real_positions(ctx)[..., None], new, x).astype(value.dtype).reshape(value.shape)


def next_token_ce(logits, tokens, mask):
    """Per-position next-token cross-entropy `[B, T-1]` and the mask of positions that count."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    ce = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    valid = (mask[:, :-1] > 0) & (mask[:, 1:] > 0)
    return ce, valid, logp


@eqx.filter_jit
def _ce_one(model, tokens, mask, interventions, clean_logp):
    logits, _ = forward(model, tokens, attention_mask=mask, interventions=interventions)
    return ce_and_kl(logits, tokens, mask, clean_logp)


def ce_and_kl(logits, tokens, mask, clean_logp):
    """Mean next-token CE of `logits [B, T, V]` and mean KL(clean || them) from the clean log-probabilities,
    over the positions `next_token_ce` counts."""
    ce, valid, logp = next_token_ce(logits, tokens, mask)
    n = jnp.maximum(valid.sum(), 1)
    kl = jnp.sum(jnp.exp(clean_logp) * (clean_logp - logp), -1)
    return jnp.sum(ce * valid) / n, jnp.sum(kl * valid) / n


def ce_metrics(model, saes: dict[str, SAE], tokens, mask=None) -> dict[str, dict[str, float]]:
    """CE loss clean / with each SAE spliced in / with its site zero-ablated, CE recovered and KL(clean||SAE),
    averaged over the next-token predictions of `tokens` `[B, T]`."""
    tokens = jnp.asarray(tokens)
    mask = jnp.ones_like(tokens) if mask is None else jnp.asarray(mask)
    logits, _ = forward(model, tokens, attention_mask=mask)
    ce, valid, clean_logp = next_token_ce(logits, tokens, mask)
    ce_clean = float(jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1))
    out = {}
    for hook, sae in saes.items():
        ce_sae, kl = _ce_one(model, tokens, mask, (Splice(sae, "sae"),), clean_logp)
        ce_zero, _ = _ce_one(model, tokens, mask, (Splice(sae, "zero"),), clean_logp)
        ce_sae, ce_zero, kl = float(ce_sae), float(ce_zero), float(kl)
        denom = ce_zero - ce_clean
        out[hook] = dict(ce_clean=ce_clean, ce_sae=ce_sae, ce_zero=ce_zero, kl=kl,
                         ce_recovered=(ce_zero - ce_sae) / denom if abs(denom) > 1e-9 else float("nan"))
    return out


def reconstruction_metrics(sae: SAE, x) -> dict[str, float]:
    """Explained variance, FVU, MSE and L0 of `sae` on raw activations `x [N, d_in]` (normalised space)."""
    x = jnp.asarray(x, jnp.float32)
    f = sae.encode(x)
    x_hat = sae.decode(f)
    s = sae.act_scale
    err = jnp.sum(jnp.square((x - x_hat) * s))
    var = jnp.sum(jnp.square((x - x.mean(0)) * s))
    fvu = float(err / var)
    return dict(fvu=fvu, explained_variance=1 - fvu, mse=float(err / x.size), l0=float((f > 0).sum(-1).mean()))


class _ZeroAfterFirst(Intervention):
    """`site` (every layer's MLP output) zero-ablated, except at each row's first real token."""

    where: Where
    site: str = eqx.field(static=True)

    def edit(self, value, ctx):
        return jnp.where(((ctx.positions == 0) & (ctx.attention_mask > 0))[..., None], value, 0.0)


def replacement_ce(model, tokens, mask, replaced_logits, target: str = "mlp_out") -> dict[str, float]:
    """CE of `tokens [B, T]` clean, with `replaced_logits [B, T, V]` (a replacement model's), and with every
    layer's `target` zero-ablated (the first token keeps it); CE recovered, KL(clean || replaced), KL(clean || zero)."""
    ce, valid, clean_logp = next_token_ce(forward(model, tokens, attention_mask=mask).logits, tokens, mask)
    zero = forward(model, tokens, attention_mask=mask, interventions=(_ZeroAfterFirst(Where(), target),)).logits
    out = {"ce_clean": float(jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1))}
    for name, logits in (("replaced", replaced_logits), ("zero", zero)):
        ce_x, kl = ce_and_kl(logits, tokens, mask, clean_logp)
        out[f"ce_{name}"], out["kl" if name == "replaced" else "kl_zero"] = float(ce_x), float(kl)
    denom = out["ce_zero"] - out["ce_clean"]
    out["ce_recovered"] = (out["ce_zero"] - out["ce_replaced"]) / denom if abs(denom) > 1e-9 else float("nan")
    return out
