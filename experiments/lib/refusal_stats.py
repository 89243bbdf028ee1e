"""Per-prompt scores, random-direction nulls and interval helpers shared by the three refusal studies
(`refusal_direction`, `harmfulness_refusal`, `refusal_cliff`); the statistics themselves are `interp.stats`.

    score = PromptRefusalScores(ids)                      # [B] refusal log-odds per prompt (not the batch mean)
    rows = prompt_scores(m, tokens, mask, score, ivs)     # [B] under some interventions
    null = random_like(direction, 16, seed)               # [16, D] random directions of the same norm
    est = stats.auroc(scores, y)                          # AUROC, bootstrap interval within class
"""

from __future__ import annotations

from typing import Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from interp import stats
from interp.readout import Readout, run_readout
from models.errors import InputError


class PromptRefusalScores(eqx.Module):
    """Per prompt `[B]`: the log-odds `log p(R) - log(1 - p(R))` that the next token is a refusal opening
    (`experiments.common.RefusalScore` is its batch mean)."""

    ids: Int[Array, " n"]

    def __call__(self, r: Readout) -> Array:
        logp = jax.nn.log_softmax(r.logits[:, -1].astype(jnp.float32), -1)
        lp = jax.nn.logsumexp(logp[:, self.ids], -1)
        return lp - jnp.log1p(-jnp.exp(lp) + 1e-7)


@eqx.filter_jit
def _scores(model, tokens, mask, metric, interventions):
    return metric(run_readout(model, tokens, mask, interventions))


def prompt_scores(model, tokens, mask, metric, interventions=()) -> np.ndarray:
    """`metric` (a per-prompt metric such as `PromptRefusalScores`) at each row's last token, `[B]`."""
    return np.asarray(_scores(model, jnp.asarray(tokens), jnp.asarray(mask), metric, tuple(interventions)), np.float64)


def random_like(direction, k: int, seed: int) -> np.ndarray:
    """`k` Gaussian random directions `[k, D]` with the norm of `direction` `[D]` (a random-direction null)."""
    if k < 1:
        raise InputError(f"n_null must be >= 1, got {k}")
    d = np.asarray(direction, np.float64)
    r = np.random.default_rng(seed).standard_normal((k, d.shape[-1]))
    return (r / np.linalg.norm(r, axis=-1, keepdims=True) * np.linalg.norm(d)).astype(np.float32)


def rate_estimate(flags, label: str = "") -> stats.Estimate:
    """A rate from per-prompt booleans with its Wilson interval."""
    f = np.asarray(flags, bool)
    return stats.wilson(int(f.sum()), int(f.size), label=label)


def cell_holds(v: stats.Verdict, tests: Mapping[str, stats.Estimate | stats.NullTest], name: str,
               alpha: float = 0.05) -> bool:
    """Whether cell `name` of a verdict holds on its own terms ("greater": Holm p < alpha and the interval, or for
    a null test the observed value, above 0 / the null's 95th percentile): the cells are oriented so that the
    paper's direction is positive."""
    t = tests[name]
    above = t.observed > t.band[1] if isinstance(t, stats.NullTest) else t.lo > 0
    return bool(v.p_holm[name] < alpha and above)


def beats_null(v: stats.Verdict, tests: Mapping[str, stats.Estimate | stats.NullTest], mean_cell: str,
               null_cell: str, alpha: float = 0.05) -> bool:
    """Whether an effect beats its random control: the paired test against the null's mean holds (Holm) AND the
    observed effect lies above the null distribution's 95th percentile. The paired test alone treats the null's
    mean as known and ignores how much random draws vary; the percentile's p cannot go below 1/(K+1) (0.059 at
    K = 16), so it is required as a position, not as a p-value."""
    t = tests[null_cell]
    return cell_holds(v, tests, mean_cell, alpha) and bool(t.observed > t.band[1])


def primary_verdict(v: stats.Verdict, tests: Mapping[str, stats.Estimate | stats.NullTest],
                    alpha: float = 0.05) -> tuple[bool, str]:
    """The verdict a report states on its primary cell: `(holds, markdown sentence)`. A primary "... vs null mean"
    cell with a matching "... vs null (percentile)" cell holds only as `beats_null` says (the paired test against
    the null's mean AND above the null's 95th percentile), and the sentence says so; any other primary holds as
    `v.holds` says. So a report's verdict and its Claims table cannot disagree about the primary comparison."""
    null_cell = v.primary.replace("vs null mean", "vs null (percentile)")
    if "vs null mean" not in v.primary or null_cell not in tests:
        return bool(v.holds), v.sentence
    t = tests[null_cell]
    above = bool(t.observed > t.band[1])
    holds = beats_null(v, tests, v.primary, null_cell, alpha)
    return holds, (f"{v.sentence} The effect must also lie above the null's 95th percentile (the paired test treats "
                   f"the null's mean as known and ignores how much random draws vary): **it "
                   f"{'does' if above else 'does not'}** ({t}). Overall: **{'holds' if holds else 'does not hold'}**.")


def check_stats_fields(cfg, cells: Sequence[str]) -> None:
    """Config checks shared by the three studies: `n_null >= 1` (16 by default), `primary` one of `cells`."""
    if not isinstance(cfg.n_null, int) or cfg.n_null < 1:
        raise InputError(f"n_null must be an integer >= 1 (random draws in each null distribution; 16 by default), "
                         f"got {cfg.n_null!r}")
    if cfg.primary not in cells:
        raise InputError(f"primary must be one of {list(cells)}, got {cfg.primary!r}")


def as_dict(t: stats.Estimate | stats.NullTest) -> dict:
    """An estimate or null test as plain numbers for `metrics.json` (NaN stays NaN: `undefined_to_none` maps it)."""
    if isinstance(t, stats.NullTest):
        return dict(observed=t.observed, percentile=t.percentile, band=list(t.band), p=t.p, k=t.k,
                    null=t.null.tolist())
    return dict(value=t.value, lo=t.lo, hi=t.hi, n=t.n, p=t.p, method=t.method)
