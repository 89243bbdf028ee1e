"""Linear probes for every (layer, position) cell at once: one jitted, vmapped optax loop over the grid.

    import models
    from interp import data, probes, positions as pos
    m = models.load("smollm2-135m-instruct")
    texts = [m.apply_chat_template([{"role": "user", "content": s}]) for s in harmful + harmless]
    acts, labels = probes.collect(m, texts, (pos.LastInstruction(), pos.PostInstruction())), y   # [L, N, P, D]
    grid = probes.train(acts, y, C=1.0, seed=0)          # 60/20/20 stratified split, L-BFGS, class-balanced
    grid.metrics["test"]["auroc"]                         # [L, P]; also "accuracy", "brier", "ece"
    grid.best                                             # (layer, position) with the best validation AUROC
    grid.summary(texts=harmful + harmless)                # its test metrics beside the surface-only baseline
    probes.heatmap(grid, "auroc", "val").savefig("probes.png")
    probe = grid.probes.cell(*grid.best); probes.save("probe", probe)

A probe's logit is `((x - mean) / scale) @ w + b`: the normaliser (`mean`, `scale`, per-feature
standardisation fitted on the training split) is part of the probe and saved with it. The logistic objective is
scikit-learn's `C * sum_i s_i * logloss_i + ||w||^2 / 2` (bias unpenalised, `s_i` = balanced class weights),
minimised by `optax.lbfgs` for at most a fixed number of steps in a `lax.while_loop`, vmapped over the cells.
"""

from __future__ import annotations

import json
import zipfile
from functools import partial
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.stats import rankdata  # scipy comes with jax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import models
from interp import positions as _positions
from interp import data as _data
from interp.data import split
from interp import progress
from interp.plot import heatmap as _heatmap
from models.errors import InputError
from models.sharding import shard_batch, to_host

__all__ = [
    "GridResult", "Probes", "apply", "auroc", "collect", "fit_diff_of_means", "fit_logistic", "heatmap", "load",
    "metrics", "resample", "save", "split_indices", "surface_baseline", "surface_baseline_split", "tail_align", "train",
    "trajectory", "trajectory_plot",
]


# --------------------------------------------------------------------------------------------- collection

def _as_selectors(positions) -> tuple:
    if positions is None:
        return (_positions.FromEnd(-1),)
    if callable(positions):
        return (positions,)
    return tuple(positions)


def _position_labels(selectors, n_per: Sequence[int]) -> list[str]:
    return [label for sel, n in zip(selectors, n_per) for label in _positions.labels(sel, n)]


def collect(model, texts: Sequence[str], positions=None, site: str = "resid_post", batch_size: int = 16,
            mesh=None, return_labels: bool = False):
    """Activations of `site` at the selected positions, streamed in batches: `[L, N, P, D]` float32 numpy.

    `positions` is one selector or a sequence of them (`interp.positions`: `Absolute`, `FromEnd`,
    `LastInstruction`, `PostInstruction`, ...), concatenated along `P`. Each selector must give the same number
    of positions for every row (not `AllTokens` on ragged prompts: use `trajectory` for every token). Only
    the `[L, B, P, D]` slice of each batch is kept, so memory is bounded by one batch of activations.
    With `mesh` (a `("data", ...)` mesh, e.g. `models.sharding.sweep_mesh()`), each batch is sharded over its
    `"data"` axis (`models.sharding.shard_batch`); the batch is padded to a multiple of the data size.
    With `return_labels=True` also returns the position labels, the selectors' arguments kept
    (`interp.positions.labels`: `["FromEnd(-1)", "FromEnd(-2)", "LastInstruction", "PostInstruction[0]", ...]`).
    """
    selectors = _as_selectors(positions)
    texts = list(texts)
    if not texts:
        raise InputError("collect needs at least one text")
    n_data = 1
    if mesh is not None:
        n_data = int(mesh.shape.get("data", 1))
        batch_size = -(-batch_size // n_data) * n_data
    out, n_per = [], None
    for start in progress.iterate(range(0, len(texts), batch_size), f"collect {site}", unit="batch"):
        chunk = texts[start:start + batch_size]
        n_real = len(chunk)
        if mesh is not None and n_real % n_data:
            chunk = chunk + [chunk[0]] * (n_data - n_real % n_data)
        tokens, mask = model.tokenize(chunk)
        idxs = [jnp.asarray(sel(tokens, mask, model)) for sel in selectors]
        n_per = [int(i.shape[1]) for i in idxs]
        idx = jnp.concatenate(idxs, axis=1)
        tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
        if mesh is not None:
            tokens, mask, idx = shard_batch(tokens, mesh), shard_batch(mask, mesh), shard_batch(idx, mesh)
        acts = _gather_site(model, tokens, mask, idx, site)
        out.append(to_host(acts)[:, :n_real].astype(np.float32))
    acts = np.concatenate(out, axis=1)
    return (acts, _position_labels(selectors, n_per)) if return_labels else acts


def _gather_site(model, tokens, mask, idx, site):
    _, cache = models.forward(model, tokens, attention_mask=mask, capture=(site,))
    a = cache[site]
    if a.ndim != 4:
        raise InputError(f"site {site!r} has shape {a.shape}; probes need a [layers, batch, seq, d] site")
    return _positions.gather(a, idx, seq_axis=2)


# ------------------------------------------------------------------------------------------------ probes

LINESEARCH_STEPS = 5  # zoom line-search budget per L-BFGS iteration (vmapped: the slowest cell sets the pace)

@dataclass(frozen=True)
class Probes:
    """A grid (or one cell) of linear probes: `logit = ((x - mean) / scale) @ w + b`.

    Arrays have shape `[*cells, D]` (`b`: `[*cells]`); for a grid `cells = (L, P)`. `layers` and `positions`
    label the cell axes (one entry each for a single cell)."""

    w: np.ndarray
    b: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    kind: str = "logistic"
    model: str = ""
    site: str = "resid_post"
    layers: tuple[int, ...] = ()
    positions: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    @property
    def direction(self) -> np.ndarray:
        """Unit direction in the raw activation space (`w / scale`, normalised), `[*cells, D]`."""
        d = np.asarray(self.w) / np.asarray(self.scale)
        return d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-12)

    def cell(self, layer_index: int, position_index: int) -> "Probes":
        """One probe out of an `[L, P]` grid (indices into the grid's axes)."""
        i, j = layer_index, position_index
        return replace(self, w=np.asarray(self.w)[i, j], b=np.asarray(self.b)[i, j, ...],
                       mean=np.asarray(self.mean)[i, j], scale=np.asarray(self.scale)[i, j],
                       layers=(self.layers[i],) if self.layers else (i,),
                       positions=(self.positions[j],) if self.positions else (str(j),))

    def logits(self, x) -> jax.Array:
        """Probe logits of activations `x [..., D]` broadcasting against the probe's cell axes."""
        return _logits(jnp.asarray(self.w), jnp.asarray(self.b), jnp.asarray(self.mean), jnp.asarray(self.scale),
                       jnp.asarray(x))


@jax.jit
def _logits(w, b, mean, scale, x):
    return jnp.sum((x - mean) / scale * w, axis=-1) + b


def apply(probes: Probes, acts) -> np.ndarray:
    """Logits of a grid of probes on grid activations `[L, N, P, D]` -> `[L, N, P]`."""
    acts = jnp.asarray(acts)
    w, b, mu, sd = (jnp.asarray(a) for a in (probes.w, probes.b, probes.mean, probes.scale))
    return np.asarray(_logits(w[:, None], b[:, None], mu[:, None], sd[:, None], acts))


def _fit_one_logistic(x, y, sw, C, steps, tol, ftol=0.0):
    """L-BFGS on `sum(sw * logloss) / sum(sw) + ||w||^2 / (2 C sum(sw))` (scikit-learn's objective / (C sum sw)),
    at most `steps` iterations, stopping once the gradient norm is below `tol`."""
    n_eff = jnp.sum(sw)
    lam = 1.0 / (C * n_eff)

    def loss(p):
        w, b = p
        z = x @ w + b
        ll = jnp.logaddexp(0.0, z) - y * z  # -log sigmoid(z) for y=1, -log(1 - sigmoid(z)) for y=0
        return jnp.sum(sw * ll) / n_eff + 0.5 * lam * jnp.dot(w, w)

    opt = optax.lbfgs(linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=LINESEARCH_STEPS))
    vg = optax.value_and_grad_from_state(loss)
    p0 = (jnp.zeros(x.shape[-1], x.dtype), jnp.zeros((), x.dtype))

    def cond(carry):
        _, _, i, done, _ = carry
        return (i < steps) & ~done

    def body(carry):
        p, s, i, _, v_prev = carry
        v, g = vg(p, state=s)
        gnorm = jnp.sqrt(sum(jnp.sum(t * t) for t in jax.tree.leaves(g)))
        u, s_new = opt.update(g, s, p, value=v, grad=g, value_fn=loss)
        p_new = optax.apply_updates(p, u)
        ok = jnp.all(jnp.array([jnp.all(jnp.isfinite(t)) for t in jax.tree.leaves(p_new)]))
        # converged: small gradient, or (like scipy's factr) the last step barely lowered the loss, which in
        # float32 is where line searches start to fail and burn their whole budget
        stalled = (ftol > 0) & ((v_prev - v) <= ftol * jnp.maximum(jnp.abs(v), 1e-3))
        keep = (gnorm < tol) | stalled | ~ok
        p = jax.tree.map(lambda a, c: jnp.where(keep, a, c), p, p_new)
        s = jax.tree.map(lambda a, c: jnp.where(keep, a, c), s, s_new)
        return p, s, i + 1, keep, v

    init = (p0, opt.init(p0), jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.asarray(jnp.inf, x.dtype))
    p = jax.lax.while_loop(cond, body, init)[0]
    return p


def _train_rows(x, y, train_mask):
    """Keep only the training rows (the fit reads them many times: no point streaming the others)."""
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if train_mask is not None:
        idx = np.flatnonzero(np.asarray(train_mask))
        x, y = jnp.take(x, jnp.asarray(idx), axis=-2), y[idx]
    return x, y, jnp.ones(x.shape[-2], bool)


def fit_logistic(x, y, train_mask=None, *, C: float = 1.0, balanced: bool = True, steps: int = 100,
                 tol: float = 1e-6, ftol: float = 0.0):
    """Fit one logistic probe per cell. `x [cells..., N, D]`, `y [N]` in {0, 1}; `train_mask [N]` picks the
    training rows (default all). Each cell stops after `steps` L-BFGS iterations, once its gradient norm is below
    `tol`, or (if `ftol > 0`) once an iteration lowers the loss by less than `ftol` relative.
    Returns `(w, b, mean, scale)` with shapes `[cells..., D]`, `[cells...]`,
    `[cells..., D]` x2. Every cell is fitted by one jitted, vmapped L-BFGS loop."""
    x, y, train_mask = _train_rows(x, y, train_mask)
    cells = x.shape[:-2]
    flat = x.reshape((-1,) + x.shape[-2:])
    w, b, mu, sd = _fit_logistic_flat(flat, y, train_mask, float(C), bool(balanced), int(steps), float(tol),
                                      float(ftol))
    return (w.reshape(cells + w.shape[-1:]), b.reshape(cells), mu.reshape(cells + mu.shape[-1:]),
            sd.reshape(cells + sd.shape[-1:]))


def _masked_standardise(x, m):
    k = jnp.sum(m)
    mean = jnp.sum(x * m[:, None], axis=0) / k
    var = jnp.sum(((x - mean) ** 2) * m[:, None], axis=0) / k
    scale = jnp.sqrt(var)
    return mean, jnp.where(scale > 1e-8, scale, 1.0)


@partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _fit_logistic_flat(x, y, m, C, balanced, steps, tol, ftol):
    mf = m.astype(x.dtype)
    sw = (_balanced_weights_masked(y, mf) if balanced else mf)

    def one(xc):
        mean, scale = _masked_standardise(xc, mf)
        z = (xc - mean) / scale
        w, b = _fit_one_logistic(z, y, sw, C, steps, tol, ftol=ftol)
        return w, b, mean, scale

    return jax.vmap(one)(x)


def _balanced_weights_masked(y, m):
    n1 = jnp.sum(m * y)
    n0 = jnp.sum(m * (1 - y))
    n = n0 + n1
    w1 = n / (2 * jnp.maximum(n1, 1.0))
    w0 = n / (2 * jnp.maximum(n0, 1.0))
    return m * jnp.where(y > 0.5, w1, w0)


@partial(jax.jit, static_argnums=(3,))
def _fit_dom_flat(x, y, m, steps):
    mf = m.astype(x.dtype)

    def one(xc):
        mean, scale = _masked_standardise(xc, mf)
        mu1 = jnp.sum(xc * (mf * y)[:, None], 0) / jnp.maximum(jnp.sum(mf * y), 1.0)
        mu0 = jnp.sum(xc * (mf * (1 - y))[:, None], 0) / jnp.maximum(jnp.sum(mf * (1 - y)), 1.0)
        d = mu1 - mu0
        d = d / jnp.maximum(jnp.linalg.norm(d), 1e-12)
        proj = (xc - 0.5 * (mu0 + mu1)) @ d
        ps = jnp.sqrt(jnp.sum(mf * proj ** 2) / jnp.sum(mf)) + 1e-12
        # calibrate the 1-D projection with an (almost unregularised) balanced logistic fit: logit = a*proj + c
        (a,), c = _fit_one_logistic((proj / ps)[:, None], y, _balanced_weights_masked(y, mf), 1e4, steps, 1e-7)
        a = a / ps
        # logit = a * (x - mid) . d + c  ->  standardised coordinates: w = a * scale * d
        w = a * scale * d
        b = a * jnp.dot(mean - 0.5 * (mu0 + mu1), d) + c
        return w, b, mean, scale

    return jax.vmap(one)(x)


def fit_diff_of_means(x, y, train_mask=None, *, steps: int = 50):
    """Difference-of-means probe per cell: direction `mean(x | y=1) - mean(x | y=0)` on the training rows,
    its projection calibrated by a 1-D logistic fit (scale and offset). Same returns as `fit_logistic`."""
    x, y, train_mask = _train_rows(x, y, train_mask)
    cells = x.shape[:-2]
    w, b, mu, sd = _fit_dom_flat(x.reshape((-1,) + x.shape[-2:]), y, train_mask, int(steps))
    return (w.reshape(cells + w.shape[-1:]), b.reshape(cells), mu.reshape(cells + mu.shape[-1:]),
            sd.reshape(cells + sd.shape[-1:]))


# ----------------------------------------------------------------------------------------------- metrics

def auroc(scores, y) -> np.ndarray:
    """AUROC of `scores [..., N]` against binary `y [N]` (ties count half), `[...]`; NaN without both classes."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(y).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    flat = s.reshape(-1, s.shape[-1])
    if n1 == 0 or n0 == 0:
        return np.full(flat.shape[0], np.nan).reshape(s.shape[:-1])
    out = np.array([(rankdata(r)[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0) for r in flat])
    return out.reshape(s.shape[:-1])


def metrics(logits, y, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Per-cell `accuracy` (threshold 0.5), `auroc`, `brier` and `ece` (equal-width bins) of `logits [..., N]`."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(y, np.float64)
    p = 1.0 / (1.0 + np.exp(-z))
    acc = np.mean((z > 0) == (y > 0.5), axis=-1)
    brier = np.mean((p - y) ** 2, axis=-1)
    bins = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    ece = np.zeros(z.shape[:-1])
    for k in range(n_bins):
        inb = bins == k
        cnt = inb.sum(-1)
        conf = np.where(cnt > 0, (p * inb).sum(-1) / np.maximum(cnt, 1), 0)
        freq = np.where(cnt > 0, (y * inb).sum(-1) / np.maximum(cnt, 1), 0)
        ece += cnt / z.shape[-1] * np.abs(conf - freq)
    return {"accuracy": acc, "auroc": auroc(z, y), "brier": brier, "ece": ece}


# ------------------------------------------------------------------------------------------------- grid

def _check_fractions(fractions) -> np.ndarray:
    fr = np.asarray(fractions, np.float64)
    if fr.shape != (3,) or not np.all(np.isfinite(fr)) or np.any(fr < 0) or abs(fr.sum() - 1) > 1e-6 or fr[0] <= 0:
        raise InputError(f"fractions must be three non-negative numbers (train, val, test) summing to 1 with train > 0, "
                         f"got {tuple(fractions)}")
    return fr


def split_indices(y, fractions=(0.6, 0.2, 0.2), seed: int = 0, groups=None) -> list[np.ndarray]:
    """Seeded split of row indices into disjoint train / val / test, stratified by label.

    With `groups [N]` (any hashable ids), all rows of a group land in the same part: paired or grouped data (the
    two variants of one item, several rows from one prompt) must be split by group, or a probe learns the content a
    group shares with the label of whichever member it saw (on pairs with no signal at all, held-out AUROC falls far
    below 0.5). Groups are stratified by their label composition (e.g. every group of a pair holds both labels)."""
    _check_fractions(fractions)
    y = np.asarray(y)
    parts = [[] for _ in fractions]
    if groups is None:
        for c in np.unique(y):
            for i, p in enumerate(split(np.flatnonzero(y == c).tolist(), fractions, seed=seed + int(c))):
                parts[i] += p
        return [np.sort(np.asarray(p, np.int64)) for p in parts]
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise InputError(f"groups must give one group id per row: {y.shape[0]} rows, groups of shape {g.shape}")
    ids, inverse = np.unique(g, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == k) for k in range(len(ids))]
    stratum = [tuple(sorted(y[r].tolist())) for r in rows_of]
    for j, key in enumerate(sorted(set(stratum))):
        members = [k for k in range(len(ids)) if stratum[k] == key]
        for i, p in enumerate(split(members, fractions, seed=seed + j)):
            parts[i] += [int(r) for k in p for r in rows_of[k]]
    return [np.sort(np.asarray(p, np.int64)) for p in parts]


# ------------------------------------------------------------------------------------ surface-only baseline


def _index_rows(name: str, idx, n: int) -> np.ndarray:
    a = np.asarray(idx)
    if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"surface_baseline_split: {name} must be a non-empty 1-D array of row indices in 0..{n - 1}, "
                         f"got {a.dtype} of shape {a.shape}")
    if a.min() < 0 or a.max() >= n:
        raise InputError(f"surface_baseline_split: {name} holds row indices outside 0..{n - 1} "
                         f"(min {a.min()}, max {a.max()})")
    return a.astype(np.int64)


def surface_baseline_split(texts: Sequence[str], y, train, test, *, C: float = 1.0) -> dict[str, float]:
    """The form-only bar for a harmful/harmless result, on a split given by row indices: a balanced logistic
    regression on `interp.data.surface_features` (length, trailing punctuation, final token; vocabulary from the
    training texts) fitted on `texts[train]`, scored on `texts[test]`. Returns `{"accuracy", "auroc"}` (test).

    `texts [N]` and `y [N]` (0/1) are the rows a probe grid was trained on, in its order; `train` / `test` are
    index arrays, e.g. a grid's own `splits["train"]` / `splits["test"]` (`GridResult.surface_baseline` passes
    them), so a split made with `groups=` (pairs kept together) is the one the baseline sees too; or
    `split_indices(y, fractions, seed, groups=)` gives the same indices `train` would use."""
    texts = list(texts)
    y = np.asarray(y)
    if y.shape != (len(texts),):
        raise InputError(f"surface_baseline_split: y must give one label per text: {len(texts)} texts, y of shape "
                         f"{y.shape}")
    tr, te = _index_rows("train", train, len(texts)), _index_rows("test", test, len(texts))
    if not (np.isfinite(C) and C > 0):
        raise InputError(f"surface_baseline_split: C (inverse regularisation strength) must be finite and > 0, got {C}")
    if np.intersect1d(tr, te).size:
        raise InputError(f"surface_baseline_split: train and test share {np.intersect1d(tr, te).size} rows; they "
                         "must be disjoint")
    for name, idx in (("train", tr), ("test", te)):
        if sorted(np.unique(y[idx]).tolist()) != [0, 1]:
            raise InputError(f"surface_baseline_split: the {name} rows must hold both labels 0 and 1, got "
                             f"{np.unique(y[idx]).tolist()}")
    x, vocab = _data.surface_features([texts[i] for i in tr])
    w, b, mu, sd = (np.asarray(a, np.float64) for a in fit_logistic(x, y[tr].astype(np.float64), C=C))
    xt, _ = _data.surface_features([texts[i] for i in te], vocab)
    logit = ((xt - mu) / sd) @ w + b
    yt = y[te]
    return dict(accuracy=float(np.mean((logit > 0) == (yt == 1))), auroc=float(auroc(logit, yt)))


def surface_baseline(train_pos: Sequence[str], train_neg: Sequence[str], test_pos: Sequence[str],
                     test_neg: Sequence[str], C: float = 1.0) -> dict[str, float]:
    """`surface_baseline_split` on four lists: fitted on `train_pos` (label 1) vs `train_neg`, scored on
    `test_pos` vs `test_neg`: `{"accuracy", "auroc"}`."""
    texts = [*train_pos, *train_neg, *test_pos, *test_neg]
    y = np.r_[np.ones(len(train_pos)), np.zeros(len(train_neg)), np.ones(len(test_pos)), np.zeros(len(test_neg))]
    n_train = len(train_pos) + len(train_neg)
    return surface_baseline_split(texts, y.astype(np.int32), np.arange(n_train), np.arange(n_train, len(texts)), C=C)


@dataclass
class GridResult:
    """Probes for every (layer, position), their per-split metrics (`[L, P]` arrays), the split (`splits`: row
    indices into the `N` rows) and the labels `y [N]` they were trained on."""

    probes: Probes
    metrics: dict[str, dict[str, np.ndarray]]
    splits: dict[str, np.ndarray]
    best: tuple[int, int]
    criterion: str = "auroc"
    y: np.ndarray | None = None

    def best_metrics(self, split: str = "test") -> dict[str, float]:
        return {k: float(v[self.best]) for k, v in self.metrics[split].items()}

    def surface_baseline(self, texts: Sequence[str], C: float = 1.0) -> dict[str, float]:
        """The surface-only baseline (`surface_baseline_split`) on this grid's own split: fitted on the texts of
        its training rows, scored on its test rows (groups kept together as the grid's were). `texts [N]`: the
        raw prompts of the grid's rows, in order (not chat-formatted: the template would be every text's
        ending). Returns `{"accuracy", "auroc"}`."""
        if self.y is None:
            raise InputError("surface_baseline needs the grid's labels: train it with probes.train (which keeps y)")
        if len(texts) != len(self.y):
            raise InputError(f"texts must give one text per row the grid was trained on: {len(self.y)} rows, got "
                             f"{len(texts)} texts")
        return surface_baseline_split(texts, self.y, self.splits["train"], self.splits["test"], C=C)

    def summary(self, texts: Sequence[str] | None = None, surface: dict | None = None) -> str:
        """One line: the best cell (by the validation criterion) and its test metrics; beside them the surface
        baseline on the same split, computed from `texts` (the raw prompts of the rows, `surface_baseline`) or
        given as `surface` (`{"accuracy", "auroc"}`), with the best cell's test AUROC above it."""
        if texts is not None and surface is not None:
            raise InputError("summary takes texts= (to compute the surface baseline) or surface= (computed), not both")
        l, p = self.best
        ms = self.best_metrics("test")
        line = (f"{self.probes.kind} probes {self.metrics['test']['auroc'].shape}: best cell layer "
                f"{self.probes.layers[l]}, position {self.probes.positions[p]} (by val {self.criterion} "
                f"{self.metrics['val'][self.criterion][l, p]:.3f}); test " +
                ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
        if texts is not None:
            surface = self.surface_baseline(texts)
        if surface is not None:
            line += (f"; surface baseline (same split) test accuracy {surface['accuracy']:.3f}, auroc "
                     f"{surface['auroc']:.3f}: best cell {ms['auroc'] - surface['auroc']:+.3f} auroc above form")
        return line


def train(acts, y, *, kind: str = "logistic", C: float = 1.0, balanced: bool = True, steps: int = 100,
          tol: float = 1e-6, ftol: float = 0.0, fractions=(0.6, 0.2, 0.2), seed: int = 0,
          layers: Sequence[int] | None = None,
          positions: Sequence[str] | None = None, model: str = "", site: str = "resid_post",
          criterion: str = "auroc", groups=None) -> GridResult:
    """Train a probe for every (layer, position) of `acts [L, N, P, D]` with labels `y [N]` in one call.

    `kind`: "logistic" (L2, `C` as in scikit-learn, class-balanced) or "diff_of_means". A stratified seeded
    split (`fractions` train / val / test) picks the training rows; normalisers are fitted on train only.
    `groups [N]`: rows that belong together (the two members of a pair, every row of one prompt) share one part
    of the split (`split_indices`); pass it whenever rows are paired or grouped.
    The best cell maximises the validation `criterion`; ties go to the lower validation Brier score."""
    acts = np.asarray(acts)
    if acts.ndim != 4:
        raise InputError(f"acts must be [layers, N, positions, d], got shape {acts.shape}")
    L, N, P, D = acts.shape
    y_raw = np.asarray(y)
    if y_raw.shape != (N,):
        raise InputError(f"y must hold one label per row of acts: acts has N={N} rows, y has shape {y_raw.shape}")
    if not np.all(np.isin(y_raw, (0, 1))) or len(np.unique(y_raw)) < 2:
        raise InputError(f"y must be binary labels 0/1 containing both classes, got values {np.unique(y_raw)[:5]}")
    y = y_raw.astype(np.int32)
    if not (np.isfinite(C) and C > 0):
        raise InputError(f"C (inverse regularisation strength) must be finite and > 0, got {C}")
    if criterion not in ("auroc", "accuracy", "brier", "ece"):
        raise InputError(f"criterion must be one of auroc, accuracy, brier, ece, got {criterion!r}")
    if not np.all(np.isfinite(acts)):
        bad = np.argwhere(~np.isfinite(acts).all(axis=(1, 2, 3))).ravel()
        raise InputError(f"acts holds NaN or Inf (layers {bad.tolist()[:10]}): probes on undefined activations "
                         "would report chance")
    tr, va, te = split_indices(y, fractions, seed, groups=groups)
    for name, idx, f in zip(("train", "val", "test"), (tr, va, te), fractions):
        if f > 0 and len(np.unique(y[idx])) < 2:
            raise InputError(f"the {name} split ({len(idx)} rows, fractions {tuple(fractions)}, seed {seed}) lacks a "
                             f"class: use more rows or larger fractions")
    mask = np.zeros(N, bool)
    mask[tr] = True
    x = jnp.transpose(jnp.asarray(acts, jnp.float32), (0, 2, 1, 3))  # [L, P, N, D]
    if kind == "logistic":
        w, b, mu, sd = fit_logistic(x, y, mask, C=C, balanced=balanced, steps=steps, tol=tol, ftol=ftol)
    elif kind in ("diff_of_means", "dom"):
        w, b, mu, sd = fit_diff_of_means(x, y, mask)
        kind = "diff_of_means"
    else:
        raise InputError(f"kind must be 'logistic' or 'diff_of_means', got {kind!r}")
    logits = np.asarray(_logits(w[:, :, None], b[:, :, None], mu[:, :, None], sd[:, :, None], x))  # [L, P, N]
    splits = {"train": tr, "val": va, "test": te}
    mets = {name: metrics(logits[..., idx], y[idx]) for name, idx in splits.items()}
    crit = np.nan_to_num(mets["val"][criterion], nan=-np.inf)
    if criterion in ("brier", "ece"):
        crit = -crit
    # ties on the criterion (AUROC saturates at 1 on small validation sets) go to the lower validation Brier score
    tied = crit >= np.max(crit) - 1e-12
    brier = np.where(tied, np.nan_to_num(mets["val"]["brier"], nan=np.inf), np.inf)
    best = tuple(int(i) for i in np.unravel_index(np.argmin(brier), crit.shape))
    probes = Probes(np.asarray(w), np.asarray(b), np.asarray(mu), np.asarray(sd), kind=kind, model=model, site=site,
                    layers=tuple(range(L)) if layers is None else tuple(int(i) for i in layers),
                    positions=tuple(str(i) for i in range(P)) if positions is None else tuple(positions),
                    extra={"C": C, "balanced": balanced, "steps": steps, "seed": seed, "fractions": list(fractions),
                           "grouped_split": groups is not None})
    return GridResult(probes, mets, splits, best, criterion, y=y)


def heatmap(result: GridResult, metric: str = "auroc", split: str = "val", path: str | None = None, **kw) -> Figure:
    """`[layers, positions]` heatmap of one metric (a `matplotlib.figure.Figure`, Agg canvas)."""
    v = result.metrics[split][metric]
    center = kw.pop("center", 0.5 if metric in ("auroc", "accuracy") else None)
    return _heatmap(v, title=kw.pop("title", f"{result.probes.kind} probe {split} {metric}"), xlabel="position",
                    ylabel="layer", xticks=list(result.probes.positions), yticks=[str(l) for l in result.probes.layers],
                    center=center, cmap=kw.pop("cmap", "RdBu_r" if center is not None else "viridis"),
                    colorbar_label=metric, path=path, **kw)


# ------------------------------------------------------------------------------------------ trajectories

def trajectory(probe: Probes, model, texts: Sequence[str], batch_size: int = 8, prob: bool = True):
    """Apply one probe (a `Probes.cell`) to every token of each text (prompt + generated response, as one
    string): returns `(scores [B, T], mask [B, T])`, left-padded like `model.tokenize` (tail-aligned)."""
    if np.ndim(probe.b) != 0:
        raise InputError("trajectory needs one probe: use grid.probes.cell(layer, position)")
    layer = int(probe.layers[0]) if probe.layers else 0
    texts = list(texts)
    tokens, mask = model.tokenize(texts)
    scores = []
    for s in range(0, len(texts), batch_size):
        t, m = jnp.asarray(tokens[s:s + batch_size]), jnp.asarray(mask[s:s + batch_size])
        _, cache = models.forward(model, t, attention_mask=m, capture=(models.Capture(probe.site, layers=(layer,)),))
        a = cache[probe.site]
        a = a[0] if a.ndim == 4 else a  # [B, T, D]
        z = probe.logits(a)
        scores.append(np.asarray(jax.nn.sigmoid(z) if prob else z))
    return np.concatenate(scores, 0), np.asarray(mask)


def _rows(scores, mask):
    s, m = np.asarray(scores, np.float64), np.asarray(mask) > 0
    return [r[k] for r, k in zip(s, m)]


def tail_align(scores, mask, length: int | None = None) -> np.ndarray:
    """Right-align each row's real tokens: `[B, length]`, the last token in the last column, NaN before a row's
    start. `length` defaults to the longest row (rows longer than `length` keep their last `length` tokens)."""
    rows = _rows(scores, mask)
    length = max(len(r) for r in rows) if length is None else int(length)
    out = np.full((len(rows), length), np.nan)
    for i, r in enumerate(rows):
        r = r[-length:] if length else r[:0]
        out[i, length - len(r):] = r
    return out


def resample(scores, mask, n_points: int = 50, tail: int | None = None) -> np.ndarray:
    """Linearly resample each row's real tokens (optionally only its last `tail`) to `n_points` points over
    its normalised position 0..1: `[B, n_points]`, so prompts of different lengths can be averaged."""
    rows = _rows(scores, mask)
    grid = np.linspace(0.0, 1.0, n_points)
    out = np.empty((len(rows), n_points))
    for i, r in enumerate(rows):
        r = r if tail is None else r[-tail:]
        out[i] = r[0] if len(r) == 1 else np.interp(grid, np.linspace(0.0, 1.0, len(r)), r)
    return out


def trajectory_plot(curves: dict[str, np.ndarray] | np.ndarray, *, x=None, band: str = "ci95", title: str = "",
                    xlabel: str = "normalised position", ylabel: str = "P(positive)",
                    vlines: Sequence[float] = (), path: str | None = None) -> Figure:
    """Mean curve of each group (`{label: [B, n]}`, NaN ignored) with a band: "ci95" (1.96 s.e.m.) or "std"."""
    if not isinstance(curves, dict):
        curves = {"": curves}
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, c in curves.items():
        c = np.asarray(c, np.float64)
        xs = np.arange(c.shape[1]) if x is None else np.asarray(x)
        mu = np.nanmean(c, 0)
        sd = np.nanstd(c, 0)
        n = np.maximum(np.sum(~np.isnan(c), 0), 1)
        half = 1.96 * sd / np.sqrt(n) if band == "ci95" else sd
        ax.plot(xs, mu, label=label or None)
        ax.fill_between(xs, mu - half, mu + half, alpha=0.25)
    for v in vlines:
        ax.axvline(v, color="grey", ls="--", lw=0.8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if any(curves):
        ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# -------------------------------------------------------------------------------------------- save / load

def save(path: str | Path, probes: Probes) -> tuple[Path, Path]:
    """Write `path.npz` (w, b, mean, scale) and `path.json` (kind, model, site, layers, positions, normaliser)."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".npz", ".json") else path
    npz, meta = base.with_name(base.name + ".npz"), base.with_name(base.name + ".json")
    np.savez(npz, w=np.asarray(probes.w), b=np.asarray(probes.b), mean=np.asarray(probes.mean),
             scale=np.asarray(probes.scale))
    info: dict[str, Any] = {
        "format": "interp.probes/1", "kind": probes.kind, "model": probes.model, "site": probes.site,
        "layers": list(probes.layers), "positions": list(probes.positions),
        "layer": probes.layers[0] if len(probes.layers) == 1 else None,
        "position": probes.positions[0] if len(probes.positions) == 1 else None,
        "normaliser": "standardise: (x - mean) / scale, fitted on the training split",
        "logit": "((x - mean) / scale) @ w + b", "shape": list(np.shape(probes.w)), "extra": probes.extra,
    }
    meta.write_text(json.dumps(info, indent=2))
    return npz, meta


def load(path: str | Path, model=None) -> Probes:
    """Inverse of `save` (give the base path, or either file).

    Checks the arrays against each other (`w`, `mean`, `scale` `[*cells, D]`, `b` `[*cells]`, finite, `scale > 0`)
    and against the JSON (kind, shape, one layer / position label per grid cell); with `model` (a `models.Model`
    or `models.Config`) also the site, the layers and `D` against the model. Anything else is an InputError
    naming the file."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".npz", ".json") else path
    meta, npz = base.with_name(base.name + ".json"), base.with_name(base.name + ".npz")
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        kind, model_name, site = info["kind"], info["model"], info["site"]
        layers, labels = tuple(int(x) for x in info["layers"]), tuple(str(x) for x in info["positions"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{meta} is not a probe description ({type(e).__name__}: {e}); expected the JSON that "
                         "probes.save writes (kind, model, site, layers, positions)") from None
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in ("w", "b", "mean", "scale")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise InputError(f"{npz} is not a readable probe file with w, b, mean, scale (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from None
    _check_probe(npz, arrays, kind, info.get("shape"), layers, labels)
    if model is not None:
        _check_probe_model(npz, model, site, layers, arrays["w"].shape[-1])
    return Probes(**arrays, kind=kind, model=model_name, site=site, layers=layers, positions=labels,
                  extra=info.get("extra", {}))


def _check_probe(where, a: dict, kind: str, shape, layers, labels):
    w = a["w"]
    if kind not in ("logistic", "diff_of_means"):
        raise InputError(f"{where}: unknown probe kind {kind!r} (logistic, diff_of_means)")
    if w.ndim < 1 or w.shape[-1] < 1:
        raise InputError(f"{where}: w must be [*cells, D], got shape {w.shape}")
    want = {"w": w.shape, "mean": w.shape, "scale": w.shape, "b": w.shape[:-1]}
    for name, expected in want.items():
        if a[name].shape != expected:
            raise InputError(f"{where}: {name} has shape {a[name].shape}, expected {expected} for w {w.shape}")
        if not np.all(np.isfinite(a[name])):
            raise InputError(f"{where}: {name} holds non-finite values (NaN or Inf)")
    if not np.all(a["scale"] > 0):
        raise InputError(f"{where}: scale must be > 0 everywhere (it divides the activations)")
    if shape is not None and tuple(shape) != w.shape:
        raise InputError(f"{where}: the JSON says shape {tuple(shape)} but w has shape {w.shape}")
    cells = w.shape[:-1]
    n = cells if len(cells) == 2 else (1, 1) if not cells else None  # labels per cell axis (if labelled)
    if n is not None and (len(layers) not in (0, n[0]) or len(labels) not in (0, n[1])):
        raise InputError(f"{where}: {cells or 'one'} cell(s) need {n[0]} layer and {n[1]} position labels, the JSON "
                         f"has layers {list(layers)} and positions {list(labels)}")


def _check_probe_model(where, model, site: str, layers, d: int):
    from models.sites import check_site

    cfg = getattr(model, "cfg", model)
    try:
        info = check_site(site)
    except KeyError as e:
        raise InputError(f"{where}: {e.args[0]}") from None
    width = {"embed": cfg.d_model, "mlp": cfg.d_mlp}.get(info.axes[-1]) if info.per_layer and len(info.axes) == 3 else None
    if width is None:
        raise InputError(f"{where}: site {site!r} is not a [layers, batch, seq, d] site that probes read")
    if d != width:
        raise InputError(f"{where}: probes have D={d} but the model's {site!r} has width {width}")
    bad = [layer for layer in layers if not 0 <= layer < cfg.n_layers]
    if bad:
        raise InputError(f"{where}: layers {bad} are outside the model's {cfg.n_layers} layers")
