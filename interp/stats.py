"""The statistics every study report uses: intervals over items, paired tests, null distributions, Holm, verdicts.

    from interp import stats
    stats.paired_difference(steered, unsteered)    # per-item difference: bootstrap CI, sign-flip permutation p
    stats.wilson(5, 16)                            # a rate with its Wilson interval
    stats.rate_difference(5, 16, 0, 16)            # two independent rates: Newcombe interval, Fisher exact p
    stats.null_test(effect, random_effects)        # the effect's percentile in K >= 16 random draws
    stats.rank_correlation(a, b)                   # Spearman; NaN under 3 pairs or with a constant side
    v = stats.verdict({"a": est_a, "b": est_b}, primary="a")   # Holm over the cells, a generated sentence
    print(v.sentence); print(v.table)

Conventions: every estimate carries its `n` and a two-sided `level` interval; p-values are two-sided unless an
`alternative` says otherwise; resampling is seeded (`seed=0`) so a report is reproducible. Items are rows (axis 0):
a *paired* comparison (two conditions on the same prompts, bandits or draws) is always tested on the per-item
difference, never by combining two standard errors. Bad input (NaN, no items, mismatched pairs) is an `InputError`
naming the argument (except `rank_correlation`, a descriptive number: its one NaN rule is in its docstring).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata  # scipy comes with jax

from models.errors import InputError

__all__ = [
    "ALTERNATIVES", "Claim", "Estimate", "NullTest", "Verdict", "auroc", "bootstrap", "claims_section", "fisher_exact", "holm",
    "markdown_table", "mcnemar_exact", "mean_difference", "null_test", "paired_difference", "paired_rate_difference",
    "rank_correlation", "rate_difference", "verdict", "wilson",
]

ALTERNATIVES = ("two-sided", "greater", "less")
EXACT_SIGN_FLIPS = 16  # paired permutation tests enumerate all 2**n sign flips up to this many items


def _num(x: float) -> str:
    """A number for a report: 3 decimals, scientific when tiny, "undefined" for NaN."""
    if x is None or not np.isfinite(x):
        return "undefined"
    return f"{x:+.2e}" if x != 0 and abs(x) < 1e-3 else f"{x:+.3f}"


def _pnum(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "undefined"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


@dataclass(frozen=True)
class Estimate:
    """An effect with its interval: `value` in `[lo, hi]` (two-sided `level`), over `n` items, with a p-value
    (`nan` where no test applies) and the `method` that produced them."""

    value: float
    lo: float
    hi: float
    n: int
    p: float = float("nan")
    label: str = ""
    method: str = ""
    level: float = 0.95

    def __str__(self) -> str:
        p = "" if not np.isfinite(self.p) else f", p={_pnum(self.p)}"
        return f"{_num(self.value)} [{_num(self.lo)}, {_num(self.hi)}] (n={self.n}{p})"

    def __repr__(self) -> str:
        name = f"{self.label}: " if self.label else ""
        return f"Estimate({name}{self}, {self.method})"

    def excludes(self, x: float = 0.0) -> bool:
        """Whether the interval lies entirely on one side of `x`."""
        return bool(self.lo > x or self.hi < x)


@dataclass(frozen=True)
class NullTest:
    """An observed effect against a null distribution of `k` random draws (random directions, features, layers,
    shuffled labels): its `percentile` in the null (0-100, ties count half), the null's 5-95% `band`, and the
    permutation-style p-value `(1 + #draws at least as extreme) / (k + 1)` for `alternative`."""

    observed: float
    null: np.ndarray
    percentile: float
    band: tuple[float, float]
    p: float
    alternative: str = "greater"
    label: str = ""

    @property
    def k(self) -> int:
        return int(self.null.size)

    @property
    def value(self) -> float:  # so a NullTest can stand where an Estimate does (verdict tables)
        return self.observed

    @property
    def n(self) -> int:
        return self.k

    def __str__(self) -> str:
        return (f"{_num(self.observed)} at the {self.percentile:.0f}th percentile of {self.k} null draws (null 5-95%: "
                f"[{_num(self.band[0])}, {_num(self.band[1])}], p={_pnum(self.p)})")

    def __repr__(self) -> str:
        name = f"{self.label}: " if self.label else ""
        return f"NullTest({name}{self})"


# --------------------------------------------------------------------------------------------- checking

def _level(level: float) -> float:
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise InputError(f"level must be in (0, 1), got {level!r}")
    return float(level)


def _alternative(alternative: str) -> str:
    if alternative not in ALTERNATIVES:
        raise InputError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    return alternative


def _items(x, name: str, min_n: int = 1) -> np.ndarray:
    a = np.asarray(x, np.float64)
    if a.ndim == 0:
        a = a[None]
    if a.shape[0] < min_n:
        raise InputError(f"{name} needs at least {min_n} item(s) along axis 0, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name} holds NaN or Inf ({int(np.sum(~np.isfinite(a)))} of {a.size} values): "
                         "drop or impute undefined items before testing")
    return a


def _count(k, n, name: str) -> tuple[int, int]:
    if not (float(k).is_integer() and float(n).is_integer()) or n < 1 or not 0 <= k <= n:
        raise InputError(f"{name}: need integers 0 <= k <= n with n >= 1, got k={k}, n={n}")
    return int(k), int(n)


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def _percentile_ci(draws: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(draws, [a, 1 - a], axis=0)
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------ resampling

def bootstrap(x, stat: Callable = np.mean, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0,
              label: str = "") -> Estimate:
    """Percentile bootstrap interval of `stat(x, axis=0)` over the items (rows, axis 0) of `x [n, ...]`; `stat`
    must reduce axis 0 to a scalar and accept `axis=`. No p-value (test a difference with `paired_difference`)."""
    a = _items(x, "x")
    level = _level(level)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.shape[0], (int(n_boot), a.shape[0]))
    draws = np.asarray(stat(a[idx], axis=1), np.float64).reshape(int(n_boot), -1)
    if draws.shape[1] != 1:
        raise InputError(f"stat must reduce x {a.shape} to one number per resample, got {draws.shape[1]}")
    lo, hi = _percentile_ci(draws[:, 0], level)
    return Estimate(float(stat(a, axis=0)), lo, hi, a.shape[0], label=label, method=f"percentile bootstrap ({n_boot})",
                    level=level)


def _auroc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC of positive scores `pos [..., n1]` against negative `neg [..., n0]` (ties count half), `[...]`."""
    ranks = rankdata(np.concatenate([pos, neg], -1), axis=-1)
    n1, n0 = pos.shape[-1], neg.shape[-1]
    return (ranks[..., :n1].sum(-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation of `a` and `b` (flattened, the same size; ties get their average rank).

    The one NaN rule: the result is NaN when there are fewer than 3 pairs or either input is constant (too few
    points to rank, or no order to agree with), and NaN when either input holds a NaN; it never warns."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if x.size != y.size:
        raise InputError(f"rank_correlation needs inputs of the same size, got {np.shape(a)} and {np.shape(b)}")
    if x.size < 3 or np.isnan(x).any() or np.isnan(y).any() or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx @ ry) / np.sqrt((rx @ rx) * (ry @ ry)))


def auroc(scores, y, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0, label: str = "") -> Estimate:
    """AUROC of `scores [n]` for binary labels `y [n]` (1 = positive; ties count half) with a percentile bootstrap
    interval that resamples within each class (the class sizes are the design's, so every resample has both);
    `p` is the one-sided Mann-Whitney p of AUROC > 0.5 (normal approximation with the tie correction)."""
    s = _items(scores, "scores")
    yy = np.asarray(y)
    if s.ndim != 1 or yy.shape != s.shape or not np.isin(yy, (0, 1, False, True)).all():
        raise InputError(f"auroc needs 1-D scores and 0/1 labels of the same length, got scores {s.shape}, "
                         f"y {yy.shape} with values {np.unique(yy)[:5].tolist()}")
    yy = yy.astype(bool)
    pos, neg = s[yy], s[~yy]
    if pos.size < 2 or neg.size < 2:
        raise InputError(f"auroc needs >= 2 items of each class, got {pos.size} positive and {neg.size} negative")
    level = _level(level)
    rng = np.random.default_rng(seed)
    value = float(_auroc_rows(pos, neg))
    draws = _auroc_rows(pos[rng.integers(0, pos.size, (int(n_boot), pos.size))],
                        neg[rng.integers(0, neg.size, (int(n_boot), neg.size))])
    lo, hi = _percentile_ci(draws, level)
    n1, n0, n = pos.size, neg.size, s.size
    _, counts = np.unique(s, return_counts=True)
    var = n1 * n0 / 12 * ((n + 1) - np.sum(counts ** 3 - counts) / (n * (n - 1)))
    p = 1 - NormalDist().cdf((value - 0.5) * n1 * n0 / math.sqrt(var)) if var > 0 else float("nan")
    return Estimate(value, lo, hi, n, p=float(p), label=label, level=level,
                    method=f"AUROC ({n1} pos / {n0} neg), percentile bootstrap within class ({n_boot}); "
                           "Mann-Whitney one-sided p")


def _sign_flip_p(d: np.ndarray, alternative: str, n_perm: int, rng) -> float:
    n, obs = d.size, float(np.mean(d))
    if n <= EXACT_SIGN_FLIPS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        means, exact = signs @ d / n, True
    else:
        signs = rng.choice((1.0, -1.0), size=(int(n_perm), n))
        means, exact = signs @ d / n, False
    return _tail_p(obs, means, alternative, exact)


def _tail_p(obs: float, draws: np.ndarray, alternative: str, exact: bool) -> float:
    """One- or two-sided p of `obs` among `draws` of its null (two-sided: twice the smaller tail, as scipy's
    `permutation_test`); `exact` draws are the whole null, otherwise `(c + 1) / (K + 1)`."""
    tol = 1e-12 * max(1.0, abs(obs))
    tail = lambda c: float(c / draws.size) if exact else float((c + 1) / (draws.size + 1))
    ge, le = tail(np.sum(draws >= obs - tol)), tail(np.sum(draws <= obs + tol))
    if alternative == "two-sided":
        return min(1.0, 2 * min(ge, le))
    return ge if alternative == "greater" else le


def paired_difference(a, b, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0, n_perm: int = 10_000,
                      alternative: str = "two-sided", label: str = "") -> Estimate:
    """Mean of the per-item difference `a - b` (`a`, `b` `[n]`, item i of each is the same prompt, bandit or draw
    under two conditions): percentile bootstrap interval over items, and a sign-flip permutation p-value (exact over
    all `2**n` flips for n <= 16, else `n_perm` random flips). `b` may be a scalar (a one-sample test against it)."""
    a = _items(a, "a")
    b = _items(np.broadcast_to(np.asarray(b, np.float64), a.shape) if np.ndim(b) == 0 else b, "b")
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(f"a and b must be paired 1-D arrays of the same length, got {a.shape} and {b.shape}")
    d = a - b
    est = bootstrap(d, n_boot=n_boot, level=level, seed=seed)
    p = _sign_flip_p(d, _alternative(alternative), n_perm, np.random.default_rng(seed + 1))
    return Estimate(est.value, est.lo, est.hi, d.size, p, label, "paired: bootstrap CI, sign-flip permutation p", level)


def mean_difference(a, b, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0, n_perm: int = 10_000,
                    alternative: str = "two-sided", label: str = "") -> Estimate:
    """`mean(a) - mean(b)` for two independent samples: a bootstrap interval resampling each sample on its own and
    a label-permutation p-value (`n_perm` random relabellings). `n` is the smaller sample's size."""
    a, b = _items(a, "a"), _items(b, "b")
    if a.ndim != 1 or b.ndim != 1:
        raise InputError(f"a and b must be 1-D samples, got {a.shape} and {b.shape}")
    level = _level(level)
    rng = np.random.default_rng(seed)
    da = a[rng.integers(0, a.size, (int(n_boot), a.size))].mean(1)
    db = b[rng.integers(0, b.size, (int(n_boot), b.size))].mean(1)
    lo, hi = _percentile_ci(da - db, level)
    both = np.concatenate([a, b])
    perms = np.argsort(np.random.default_rng(seed + 1).random((int(n_perm), both.size)), axis=1)
    shuffled = both[perms]
    draws = shuffled[:, :a.size].mean(1) - shuffled[:, a.size:].mean(1)
    obs = float(a.mean() - b.mean())
    p = _tail_p(obs, draws - 0.0, _alternative(alternative), exact=False)
    return Estimate(obs, lo, hi, int(min(a.size, b.size)), p, label,
                    "independent: bootstrap CI, permutation p", level)


# ------------------------------------------------------------------------------------------------ rates

def wilson(k: int, n: int, level: float = 0.95, label: str = "") -> Estimate:
    """The rate `k / n` with its Wilson score interval (no continuity correction)."""
    k, n = _count(k, n, "wilson")
    z = _z(_level(level))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exactly 0 / 1 at the ends (not 7e-18 from rounding)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return Estimate(p, lo, hi, n, label=label, method="Wilson", level=level)


def _log_hypergeom(x: np.ndarray, N: int, K: int, n: int) -> np.ndarray:
    lc = lambda a, b: math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)
    return np.array([lc(K, int(i)) + lc(N - K, n - int(i)) - lc(N, n) for i in x])


def fisher_exact(k1: int, n1: int, k2: int, n2: int, alternative: str = "two-sided") -> float:
    """Fisher's exact test of `k1/n1` against `k2/n2` (the 2x2 table `[[k1, n1-k1], [k2, n2-k2]]`, as scipy's
    `fisher_exact`): "greater" tests whether the first rate is larger."""
    k1, n1 = _count(k1, n1, "fisher_exact (first)")
    k2, n2 = _count(k2, n2, "fisher_exact (second)")
    alternative = _alternative(alternative)
    N, K = n1 + n2, k1 + k2
    support = np.arange(max(0, K - n2), min(K, n1) + 1)
    logp = _log_hypergeom(support, N, K, n1)
    pmf = np.exp(logp - np.max(logp))
    pmf /= pmf.sum()
    obs = pmf[support == k1][0]
    if alternative == "greater":
        return float(min(1.0, pmf[support >= k1].sum()))
    if alternative == "less":
        return float(min(1.0, pmf[support <= k1].sum()))
    return float(min(1.0, pmf[pmf <= obs * (1 + 1e-7)].sum()))


def rate_difference(k1: int, n1: int, k2: int, n2: int, level: float = 0.95, label: str = "") -> Estimate:
    """`k1/n1 - k2/n2` for two independent groups: Newcombe's hybrid score interval (from the two Wilson
    intervals) and Fisher's exact two-sided p."""
    a, b = wilson(k1, n1, level), wilson(k2, n2, level)
    d = a.value - b.value
    lo = d - math.sqrt((a.value - a.lo) ** 2 + (b.hi - b.value) ** 2)
    hi = d + math.sqrt((a.hi - a.value) ** 2 + (b.value - b.lo) ** 2)
    return Estimate(d, lo, hi, int(min(n1, n2)), fisher_exact(k1, n1, k2, n2), label,
                    "independent rates: Newcombe CI, Fisher exact p", level)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar p (two-sided): `b`, `c` the discordant counts (yes/no and no/yes)."""
    if b < 0 or c < 0 or not (float(b).is_integer() and float(c).is_integer()):
        raise InputError(f"mcnemar_exact: discordant counts must be non-negative integers, got b={b}, c={c}")
    n = int(b + c)
    if n == 0:
        return 1.0
    k = int(min(b, c))
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return float(min(1.0, 2 * tail))


def paired_rate_difference(x, y, *, level: float = 0.95, n_boot: int = 10_000, seed: int = 0,
                           label: str = "") -> Estimate:
    """`mean(x) - mean(y)` for per-item booleans of two conditions on the same items (e.g. refused steered /
    unsteered, same prompts): a percentile bootstrap interval over items and the exact McNemar p."""
    xa, ya = _items(x, "x"), _items(y, "y")
    if xa.shape != ya.shape or xa.ndim != 1:
        raise InputError(f"x and y must be paired 1-D arrays of the same length, got {xa.shape} and {ya.shape}")
    if not (np.isin(xa, (0, 1)).all() and np.isin(ya, (0, 1)).all()):
        raise InputError("x and y must hold booleans (0/1) per item")
    est = bootstrap(xa - ya, n_boot=n_boot, level=level, seed=seed)
    b, c = int(np.sum((xa == 1) & (ya == 0))), int(np.sum((xa == 0) & (ya == 1)))
    return Estimate(est.value, est.lo, est.hi, xa.size, mcnemar_exact(b, c), label,
                    "paired rates: bootstrap CI, exact McNemar p", level)


# -------------------------------------------------------------------------------------- multiple testing

def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order (step-down, monotone, capped at 1)."""
    p = np.asarray(pvalues, np.float64).reshape(-1)
    if p.size == 0:
        raise InputError("holm needs at least one p-value")
    if not np.all((p >= 0) & (p <= 1)):
        raise InputError(f"p-values must be in [0, 1] (no NaN), got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="mergesort")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj
    return out


# ------------------------------------------------------------------------------------------------- nulls

def null_test(observed: float, null_draws, alternative: str = "greater", label: str = "") -> NullTest:
    """`observed` against `null_draws [K]` (K >= 1; use K >= 16, the studies' default): its percentile in the null,
    the null's 5-95% band, and `(1 + #draws at least as extreme) / (K + 1)` for `alternative` ("greater": the
    effect is larger than chance; "two-sided" compares distances from the null's median).

    The p-value cannot go below `1 / (K + 1)`: with K = 16 that is 0.059, so a verdict at alpha 0.05 needs
    K >= 20 draws (more under Holm), or a per-item test against the null's mean (`paired_difference` of the
    effect minus the draws' mean per item) with the percentile reported beside it."""
    alternative = _alternative(alternative)
    null = _items(null_draws, "null_draws").reshape(-1)
    obs = float(_items(observed, "observed").reshape(-1)[0]) if np.ndim(observed) == 0 else None
    if obs is None:
        raise InputError(f"observed must be one number, got shape {np.shape(observed)}")
    pct = 100.0 * (np.mean(null < obs) + 0.5 * np.mean(null == obs))
    lo, hi = np.percentile(null, [5, 95])
    if alternative == "greater":
        c = np.sum(null >= obs)
    elif alternative == "less":
        c = np.sum(null <= obs)
    else:
        med = np.median(null)
        c = np.sum(np.abs(null - med) >= abs(obs - med))
    return NullTest(obs, null, float(pct), (float(lo), float(hi)), float((c + 1) / (null.size + 1)), alternative,
                    label)


# ---------------------------------------------------------------------------------------------- verdicts

def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table; floats as in reports (3 decimals, scientific when tiny, NaN as "undefined"); a "|"
    inside a cell is escaped so it cannot split the row."""
    cell = lambda v: _num(v).lstrip("+") if isinstance(v, (float, np.floating)) else str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if len(r) != len(header):
            raise InputError(f"row {list(r)} has {len(r)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(cell(v) for v in r) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Verdict:
    """The outcome of a study's primary comparison, named before the run: `holds`, a generated `sentence`, and a
    `table` of every cell scanned (raw and Holm-adjusted p; the primary marked, the rest exploratory)."""

    primary: str
    holds: bool
    sentence: str
    table: str
    p_holm: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Verdict({self.primary!r}: {'holds' if self.holds else 'does not hold'})"

    def _repr_markdown_(self) -> str:
        return self.sentence + "\n\n" + self.table


def verdict(tests: Mapping[str, Estimate | NullTest], primary: str, *, alpha: float = 0.05,
            alternative: str = "greater", margin: float = 0.0, what: str = "") -> Verdict:
    """The verdict on `tests[primary]`, Holm-corrected over every cell in `tests` (the cells the verdict scans).

    It holds when the Holm-adjusted p is below `alpha` and the effect lies on the `alternative` side of `margin`
    ("greater": the interval's lower end above `margin`; "less": the upper end below `-margin`; "two-sided": the
    interval excludes 0). For a `NullTest` the interval is replaced by the null's band (the observed value must lie
    beyond the band's far end). Every cell needs a finite p."""
    _alternative(alternative)
    if primary not in tests:
        raise InputError(f"primary {primary!r} is not one of the tested cells {sorted(tests)}")
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1), got {alpha}")
    names = list(tests)
    ps = [tests[k].p for k in names]
    bad = [k for k, p in zip(names, ps) if not np.isfinite(p)]
    if bad:
        raise InputError(f"cells {bad} have no p-value: every cell a verdict scans needs a test")
    adj = dict(zip(names, holm(ps)))
    t = tests[primary]
    if isinstance(t, NullTest):
        kind = "null band"
        side_ok = {"greater": t.observed > max(t.band[1], margin), "less": t.observed < min(t.band[0], -margin),
                   "two-sided": not t.band[0] <= t.observed <= t.band[1]}[alternative]
    else:
        kind = "interval"
        side_ok = {"greater": t.lo > margin, "less": t.hi < -margin, "two-sided": t.excludes(0.0)}[alternative]
    holds = bool(adj[primary] < alpha and side_ok)
    want = {"greater": f"above {margin:g}", "less": f"below {-margin:g}", "two-sided": "away from 0"}[alternative]
    why = ("" if holds else " (" + "; ".join(
        ([f"Holm p {_pnum(adj[primary])} >= {alpha:g}"] if adj[primary] >= alpha else []) +
        ([f"the {kind} is not entirely {want}"] if not side_ok else [])) + ")")
    sentence = (f"**Primary comparison, named before the run: {what or primary}** — {t}; Holm-adjusted p "
                f"{_pnum(adj[primary])} over {len(names)} cell(s), alpha {alpha:g}, alternative {alternative}"
                f"{'' if margin == 0 else f', margin {margin:g}'}: **{'holds' if holds else 'does not hold'}**{why}.")
    rows = []
    for k in names:
        e = tests[k]
        ci = (f"null 5-95% [{_num(e.band[0])}, {_num(e.band[1])}]" if isinstance(e, NullTest)
              else f"[{_num(e.lo)}, {_num(e.hi)}]")
        rows.append([k, "primary" if k == primary else "exploratory", _num(e.value), ci, e.n, _pnum(e.p),
                     _pnum(adj[k])])
    table = markdown_table(["cell", "role", "effect", "95% interval", "n", "p", "Holm p"], rows)
    return Verdict(primary, holds, sentence, table, {k: float(v) for k, v in adj.items()})


@dataclass(frozen=True)
class Claim:
    """One claim a study's README makes, the statistic it rests on, and whether the run supports it (`None`:
    not tested by this run)."""

    text: str
    statistic: str
    holds: bool | None


def claims_section(claims: Sequence[Claim]) -> str:
    """The report's "Claims" section: every claim with its statistic and whether it holds."""
    if not claims:
        raise InputError("claims_section needs at least one claim")
    mark = {True: "**holds**", False: "**does not hold**", None: "not tested"}
    return markdown_table(["claim", "statistic", "verdict"], [[c.text, c.statistic, mark[c.holds]] for c in claims])
