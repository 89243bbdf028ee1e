"""Lenses: the logit lens, the residual stream as a sum of components, and direct logit attribution.

    lens = logit_lens(model, tokens, mask)                      # [L, B, 1, V]: each layer's resid_post read out
    dec = residual_decomposition(model, tokens, mask)           # embed + heads (+ b_O) + MLPs == final residual
    dla = direct_logit_attribution(model, tokens, mask, unembed_direction(model, ok, bad))
    dla.heads                                                   # [L, B, H]: each head's share of logit[ok] - logit[bad]
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from interp.readout import as_positions, logits_from_resid
import models
from models.checks import check_call, check_positions, check_tokens, row_lengths
from models.errors import InputError
from models.sites import TL_NAMES
from models.transformer import Capture

__all__ = ["DLA", "Contributions", "Decomposition", "direct_logit_attribution", "logit_lens", "residual_decomposition", "unembed_direction"]


def _check(model, tokens, mask, positions) -> None:
    """Token ids and the read `positions` (in every row) checked before anything is traced."""
    check_call(model.cfg, tokens, mask)
    if positions is not None:
        check_positions("positions", np.asarray(positions), row_lengths(mask), int(tokens.shape[1]))


@eqx.filter_jit
def _lens(model, tokens, mask, site: str, positions):
    acts = models.forward(model, tokens, mask, None, (Capture(site, positions=positions),)).acts
    return logits_from_resid(model.params, model.cfg, acts[site])


LENS_SITES = ("resid_pre", "resid_mid", "resid_post")


def _lens_site(site) -> str:
    """`site` as a registry residual site (a TransformerLens name without a layer, `hook_resid_post`, is read
    too); anything else is an InputError listing the residual sites the lens reads."""
    name = TL_NAMES.get(site, site) if isinstance(site, str) else site
    if name not in LENS_SITES:
        what = "not a residual-stream site" if isinstance(site, str) and site in models.SITES else "unknown"
        raise InputError(f"logit_lens site={site!r} is {what}: the lens reads each layer's residual stream "
                         f"({', '.join(LENS_SITES)}; every layer is read, so no layer is named)")
    return name


def logit_lens(model, tokens, mask=None, *, site: str = "resid_post", positions: Sequence[int] | None = (-1,)):
    """Each layer's residual (`site`: resid_pre, resid_mid or resid_post) through the final norm and the
    unembedding: `[L, B, P, V]` logits at `positions`, the `p`-th real token of each row (-1 = each row's last;
    `None`: every sequence index, memory L*B*T*V). Another `site` is an InputError listing these three."""
    site = _lens_site(site)
    tokens, positions = jnp.asarray(tokens), as_positions(positions)
    _check(model, tokens, mask, positions)
    return _lens(model, tokens, mask, site, positions)


class Decomposition(NamedTuple):
    """The final residual `[B, P, D]` as `embed + sum(attn_out) + sum(mlp_out)`; for models without post-norms
    each `attn_out[l]` is further `sum_h heads[l, :, :, h] + attn_bias[l]`."""

    embed: Float[Array, "B P D"]
    attn_out: Float[Array, "L B P D"]
    mlp_out: Float[Array, "L B P D"]
    heads: Float[Array, "L B P H D"] | None  # None with post-norms (Gemma): heads are normalised together
    attn_bias: Float[Array, "L D"] | None
    resid: Float[Array, "B P D"]  # the final residual (resid_post of the last layer), for checking

    def total(self) -> Array:
        return self.embed + self.attn_out.sum(0) + self.mlp_out.sum(0)


@eqx.filter_jit
def _decompose(model, tokens, mask, positions):
    cfg = model.cfg
    sites = ["embed", "attn_out", "mlp_out", "resid_post"] + ([] if cfg.post_norms else ["attn.head_out"])
    caps = tuple(Capture(s, layers=(cfg.n_layers - 1,) if s == "resid_post" else None, positions=positions) for s in sites)
    acts = models.forward(model, tokens, mask, None, caps).acts
    bias = model.params["blocks"]["attn"].get("b_O") if not cfg.post_norms else None
    if bias is None and not cfg.post_norms:
        bias = jnp.zeros((cfg.n_layers, cfg.d_model), acts["embed"].dtype)
    return Decomposition(acts["embed"], acts["attn_out"], acts["mlp_out"], acts.get("attn.head_out"), bias,
                         acts["resid_post"][0])


def residual_decomposition(model, tokens, mask=None, *, positions: Sequence[int] | None = (-1,)) -> Decomposition:
    """Every component writing into the residual stream at `positions`, the `p`-th real token of each row
    (-1 = each row's last; `None`: every sequence index)."""
    tokens, positions = jnp.asarray(tokens), as_positions(positions)
    _check(model, tokens, mask, positions)
    return _decompose(model, tokens, mask, positions)


def unembed_direction(model, correct, wrong=None) -> Array:
    """Unembedding column(s) `W_U[:, correct] - W_U[:, wrong]`: `[D]` or `[B, D]` for per-row ids (one id each:
    `model.to_single_token(" Paris")`). Ids outside the vocabulary raise InputError."""
    p = model.params
    W_U = p["unembed"]["W_U"] if "unembed" in p else p["embed"]["W_E"].T
    check_tokens(correct, W_U.shape[1], "unembed_direction correct")
    d = jnp.take(W_U, jnp.asarray(correct), axis=1)
    if wrong is not None:
        check_tokens(wrong, W_U.shape[1], "unembed_direction wrong")
        d = d - jnp.take(W_U, jnp.asarray(wrong), axis=1)
    return jnp.moveaxis(d, 0, -1).astype(jnp.float32)


class Contributions(NamedTuple):
    """Named contributions of one row, largest magnitude first (`DLA.top`): `names` ("embed", "L3H2", "L3 MLP",
    "L3 b_O", "L3 attn", "biases") and `values`; `total` is the whole logit along the direction. `str()` /
    `repr()` is an aligned table, `table()` a markdown one."""

    names: tuple[str, ...]
    values: tuple[float, ...]
    total: float
    label: str = ""

    def rows(self) -> list[tuple[str, float, float]]:
        """`(name, value, share of the total)` per component."""
        return [(n, v, v / self.total if self.total else float("nan")) for n, v in zip(self.names, self.values)]

    def table(self) -> str:
        head = f"| component | contribution{' to ' + self.label if self.label else ''} | share of total |"
        lines = [head, "|---|---:|---:|"] + [f"| {n} | {v:+.4f} | {s:+.1%} |" for n, v, s in self.rows()]
        return "\n".join(lines + [f"| total | {self.total:+.4f} | |"])

    def __repr__(self) -> str:
        width = max([len(n) for n in self.names] + [5])
        title = f"direct logit attribution{' to ' + self.label if self.label else ''} (top {len(self.names)})"
        lines = [f"  {n:<{width}}  {v:+9.4f}  {s:+7.1%}" for n, v, s in self.rows()]
        return "\n".join([title] + lines + [f"  {'total':<{width}}  {self.total:+9.4f}"])

    __str__ = __repr__


class DLA(NamedTuple):
    """Direct logit attribution at one position: each component's share of the logit along a direction,
    after the final norm's scale (frozen at its value on the real run). `total()` equals the logit (before
    the final soft-cap) of the direction, biases included. `top(k)` names the largest components of a row
    (heads `L{l}H{h}`, MLPs, embedding, biases); `repr` is a one-line summary."""

    embed: Float[Array, " B"]
    attn: Float[Array, "L B"]
    mlp: Float[Array, "L B"]
    heads: Float[Array, "L B H"] | None
    attn_bias: Float[Array, "L B"] | None
    constant: Float[Array, " B"]  # final-norm and unembedding biases along the direction

    def total(self) -> Array:
        return self.embed + self.attn.sum(0) + self.mlp.sum(0) + self.constant

    def components(self, row: int = 0) -> dict[str, float]:
        """Every component of `row` by name; they sum to `total()[row]` (per-head models list heads and `b_O`
        instead of each layer's attention sum, Gemma-style post-norm models each layer's attention)."""
        B = int(np.shape(self.embed)[0])
        if not -B <= row < B:
            raise InputError(f"DLA row must be in [-{B}, {B}), got {row}")
        out = {"embed": float(self.embed[row])}
        L = int(np.shape(self.attn)[0])
        for layer in range(L):
            if self.heads is not None:
                out.update({f"L{layer}H{h}": float(v) for h, v in enumerate(np.asarray(self.heads[layer, row]))})
                out[f"L{layer} b_O"] = float(self.attn_bias[layer, row])
            else:
                out[f"L{layer} attn"] = float(self.attn[layer, row])
            out[f"L{layer} MLP"] = float(self.mlp[layer, row])
        out["biases"] = float(self.constant[row])
        return out

    def top(self, k: int = 10, row: int = 0, label: str = "") -> Contributions:
        """The `k` components of `row` with the largest |contribution|, named (`label`: what the direction is,
        e.g. `'" Paris" - " London"'`, for the printout)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"DLA.top k must be an int >= 1, got {k!r}")
        comps = self.components(row)
        names = sorted(comps, key=lambda n: -abs(comps[n]))[:k]
        return Contributions(tuple(names), tuple(comps[n] for n in names), float(self.total()[row]), label)

    def __repr__(self) -> str:
        L, B = np.shape(self.attn)
        heads = "" if self.heads is None else f", heads [{L}, {B}, {np.shape(self.heads)[-1]}]"
        totals = ", ".join(f"{float(t):+.3f}" for t in np.asarray(self.total())[:4]) + (", ..." if B > 4 else "")
        return f"DLA(layers={L}, rows={B}{heads}; total per row [{totals}]; .top(k) names the largest)"


def direct_logit_attribution(model, tokens, mask, direction: Float[Array, "*B D"], *, position: int = -1) -> DLA:
    """Attribute `resid . W_U`-style logits along `direction` (`[D]` or `[B, D]`, see `unembed_direction`) at
    `position` (the `position`-th real token of each row; -1 = each row's last) to the embedding, every head
    (and `b_O`) and every MLP."""
    cfg, p = model.cfg, model.params
    dec = residual_decomposition(model, tokens, mask, positions=(position,))
    d = jnp.broadcast_to(jnp.asarray(direction, jnp.float32), (dec.resid.shape[0], cfg.d_model))  # [B, D]
    x = dec.resid[:, 0].astype(jnp.float32)
    center = cfg.norm == "layer"
    if center:
        x = x - x.mean(-1, keepdims=True)
    scale = jax.lax.rsqrt(jnp.mean(x * x, -1) + cfg.norm_eps)  # [B]
    w = p["ln_final"]["w"].astype(jnp.float32)

    def through_norm(c):  # c [..., B, D] -> [..., B]
        c = c.astype(jnp.float32)
        if center:
            c = c - c.mean(-1, keepdims=True)
        return jnp.sum(c * scale[:, None] * w * d, -1)

    constant = jnp.zeros(d.shape[0])
    if "b" in p["ln_final"]:
        constant = constant + d @ p["ln_final"]["b"].astype(jnp.float32)
    heads = bias = None
    if dec.heads is not None:
        heads = jnp.moveaxis(through_norm(jnp.moveaxis(dec.heads[:, :, 0], 2, 1)), 1, 2)  # [L, H, B] -> [L, B, H]
        bias = through_norm(jnp.broadcast_to(dec.attn_bias[:, None], (cfg.n_layers,) + d.shape))
    return DLA(through_norm(dec.embed[:, 0]), through_norm(dec.attn_out[:, :, 0]), through_norm(dec.mlp_out[:, :, 0]),
               heads, bias, constant)
