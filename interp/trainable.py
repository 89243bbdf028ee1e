"""Trainable interventions: distributed alignment search (DAS, Boundless DAS), low-rank rotations and LoReFT,
trained with optax over a whole (layer, position) grid in one compiled call, and saved / loaded with the model
they were made for.

Each is an ordinary `Intervention` (a site, a `Where`, float arrays as leaves), so it runs in `models.forward`,
the sweeps and `models.generate`, `jax.grad` reaches its parameters as is, and a batch of them is `vmap`:

    das = Interchange("resid_post", basis, source_acts, layers=(6,), positions=(-1,))   # k = basis.shape[1]
    reft = LoReFT("resid_post", R, W, b, layers=(6,))
    grid = das_grid(m, base, source, cf_labels, candidates, layers=range(30), positions=(-3, -2, -1), k=1)

Orthonormality holds by construction: a free matrix is mapped to orthonormal columns by a QR decomposition with
the signs fixed (`orthonormal`), so optax updates the free matrix and the rotation never drifts.

    Interchange:          h + (s − h) Q Qᵀ            Q = orthonormal(basis) [D, k]   (DAS; pyvene's
                                                                                     RotatedSpaceIntervention)
    BoundlessInterchange: h + ((s − h) Q ⊙ m) Qᵀ      Q [D, D], m_i = σ((boundary − i) / temperature)
    LoReFT:               h + (h W + b − h R) Rᵀ      R = orthonormal(rotation) [D, r], W [D, r], b [r]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int

import models
from interp import interventions as I
from interp.grids import LayerGrid
from interp.interventions import Intervention, Where, _where
from models.checks import check_positions, real_index, row_lengths
from models.errors import InputError

FORMAT_VERSION = 1


def orthonormal(w: Float[Array, "D k"]) -> Float[Array, "D k"]:
    """Orthonormal columns spanning `w`'s (QR, signs fixed so the map is continuous and `orthonormal(Q) == Q`)."""
    q, r = jnp.linalg.qr(w.astype(jnp.float32))
    return q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)


def interchange(h: Float[Array, "... D"], s: Float[Array, "... D"], basis: Float[Array, "D k"]) -> Float[Array, "... D"]:
    """`h + (s − h) Q Qᵀ`, `Q = orthonormal(basis)`: `h` with its coordinates in the subspace taken from `s`."""
    q = orthonormal(basis)
    h = h.astype(jnp.float32)
    return h + ((s.astype(jnp.float32) - h) @ q) @ q.T


def _source(src: Array, ctx, value: Array) -> Array:
    """A source cache `[L, B, T, D]` read at the current layer, or a site-shaped `[B, T, D]` source as is."""
    return src[ctx.layer] if src.ndim == value.ndim + 1 else src


class Interchange(Intervention):
    """DAS's interchange intervention on a learned `k`-dimensional subspace: `h + Q Qᵀ (s − h)`, with
    `Q = orthonormal(basis)` `[D, k]` and `s` the source run's value (`source`: `[B, T, D]`, or a cache
    `[L, B, T, D]` read at each layer). `k = D` is activation patching; `k = 0` leaves `h`."""

    site: str = eqx.field(static=True)
    basis: Float[Array, "D k"]
    source: Float[Array, "..."]
    where: Where

    def __init__(self, site, basis, source, *, where: Where | None = None, **kw):
        self.site, self.where = _where(site, where, kw)
        self.basis, self.source = jnp.asarray(basis, jnp.float32), jnp.asarray(source)

    def edit(self, value, ctx):
        return interchange(value, _source(self.source, ctx, value), self.basis)


class BoundlessInterchange(Intervention):
    """Boundless DAS: a full rotation `Q = orthonormal(rotation)` `[D, D]` and a learned boundary; rotated
    coordinate `i` is swapped from the source with weight `σ((boundary − i) / temperature)` (anneal the
    temperature towards 0 while training for a hard boundary: `das_grid(..., boundless=True)` does)."""

    site: str = eqx.field(static=True)
    rotation: Float[Array, "D D"]
    boundary: Float[Array, ""]
    temperature: Float[Array, ""]
    source: Float[Array, "..."]
    where: Where

    def __init__(self, site, rotation, boundary, source, temperature=1.0, *, where: Where | None = None, **kw):
        self.site, self.where = _where(site, where, kw)
        self.rotation, self.source = jnp.asarray(rotation, jnp.float32), jnp.asarray(source)
        self.boundary, self.temperature = jnp.asarray(boundary, jnp.float32), jnp.asarray(temperature, jnp.float32)

    def mask(self) -> Float[Array, " D"]:
        """The soft swap weight of each rotated coordinate."""
        i = jnp.arange(self.rotation.shape[1], dtype=jnp.float32)
        return jax.nn.sigmoid((self.boundary - i) / self.temperature)

    def edit(self, value, ctx):
        q = orthonormal(self.rotation)
        s = _source(self.source, ctx, value).astype(jnp.float32)
        return value + (((s - value.astype(jnp.float32)) @ q) * self.mask()) @ q.T


class LoReFT(Intervention):
    """Low-rank representation fine-tuning (Wu et al. 2024): `h + (h W + b − h R) Rᵀ` with `R =
    orthonormal(rotation)` `[D, r]`, `W` `[D, r]`, `b` `[r]`: the subspace's coordinates `hR` are replaced by
    the learned affine function `hW + b`, everything orthogonal to it is left alone."""

    site: str = eqx.field(static=True)
    rotation: Float[Array, "D r"]
    W: Float[Array, "D r"]
    b: Float[Array, " r"]
    where: Where

    def __init__(self, site, rotation, W, b, *, where: Where | None = None, **kw):
        self.site, self.where = _where(site, where, kw)
        self.rotation, self.W, self.b = (jnp.asarray(x, jnp.float32) for x in (rotation, W, b))

    def edit(self, value, ctx):
        r = orthonormal(self.rotation)
        h = value.astype(jnp.float32)
        return h + (h @ self.W + self.b - h @ r) @ r.T


def init_loreft(site, d_model: int, rank: int, key: jax.Array, **where) -> LoReFT:
    """A LoReFT of rank `rank` that starts as the identity edit (`W = R`, `b = 0`)."""
    r = orthonormal(jax.random.normal(key, (d_model, rank)))
    return LoReFT(site, r, r, jnp.zeros(rank), **where)


# ----------------------------------------------------------------------------- save and load


_CLASSES = {c.__name__: c for c in (Interchange, BoundlessInterchange, LoReFT, I.AddVector, I.AlongDirection,
                                    I.ScaleHeads, I.Replace)}


def _where_json(w: Where) -> dict:
    out = {}
    for f in ("layers", "positions", "position_ids", "heads", "steps"):
        v = getattr(w, f, None)
        if v is not None:
            out[f] = v if isinstance(v, str) else np.asarray(v).tolist()
    if getattr(w, "tokens", None) is not None:
        raise InputError("save: an intervention selecting by `tokens=` (a sequence mask) is not saved; use positions=")
    return out


def save(intervention: Intervention, path: str | Path, model=None) -> Path:
    """Write `intervention` to `path` (a directory): `arrays.eqx` (its leaves, `eqx.tree_serialise_leaves`) and
    `intervention.json` (class, site, selection, format version, and with `model` the architecture and sizes it
    was made for, checked by `load`). Every class of `interp.interventions` built from arrays and every trainable
    one is supported; a `Function` (Python code) is not."""
    name = type(intervention).__name__
    if name not in _CLASSES:
        raise InputError(f"save: {name} is not a saveable intervention ({', '.join(_CLASSES)})")
    if not isinstance(intervention.where, Where):
        raise InputError("save: a stacked batch of interventions is saved one at a time (interventions.unstack)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    leaves = {k: np.asarray(v) for k, v in vars(intervention).items() if isinstance(v, (jax.Array, np.ndarray))}
    meta = {"format": FORMAT_VERSION, "class": name, "site": intervention.site, "where": _where_json(intervention.where),
            "shapes": {k: list(v.shape) for k, v in leaves.items()},
            "static": {k: v for k, v in vars(intervention).items() if isinstance(v, bool)}}
    if model is not None:
        meta["model"] = {"arch": model.cfg.arch, "d_model": model.cfg.d_model, "n_layers": model.cfg.n_layers,
                         "n_heads": model.cfg.n_heads, "name": getattr(model, "name", "")}
    eqx.tree_serialise_leaves(path / "arrays.eqx", intervention)
    (path / "intervention.json").write_text(json.dumps(meta, indent=1))
    return path


def load(path: str | Path, model=None) -> Intervention:
    """The intervention `save` wrote to `path`, bit-identical. With `model`, an intervention saved for another
    architecture or size is an `InputError` naming what differs (before any use)."""
    path = Path(path)
    try:
        meta = json.loads((path / "intervention.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"load: {path / 'intervention.json'} is not an intervention file ({e})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise InputError(f"load: {path} has format {meta.get('format')!r}; this version reads {FORMAT_VERSION}")
    if model is not None and "model" in meta:
        made = meta["model"]
        have = {"arch": model.cfg.arch, "d_model": model.cfg.d_model, "n_layers": model.cfg.n_layers,
                "n_heads": model.cfg.n_heads}
        diff = [f"{k} {made[k]!r} (this model: {v!r})" for k, v in have.items() if made.get(k) != v]
        if diff:
            raise InputError(f"load: {path} was made for another model: " + ", ".join(diff))
    cls = _CLASSES.get(meta.get("class"))
    if cls is None:
        raise InputError(f"load: unknown intervention class {meta.get('class')!r} in {path}")
    zeros = {k: np.zeros(s, np.float32) for k, s in meta["shapes"].items()}
    like = _skeleton(cls, meta, zeros)
    return eqx.tree_deserialise_leaves(path / "arrays.eqx", like)


def _skeleton(cls, meta: dict, z: dict) -> Intervention:
    """An instance of `cls` with the saved site, selection and static fields, and arrays of the saved shapes."""
    where = Where(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["where"].items()})
    site, st = meta["site"], meta.get("static", {})
    if cls is Interchange:
        return cls(site, z["basis"], z["source"], where=where)
    if cls is BoundlessInterchange:
        return cls(site, z["rotation"], z["boundary"], z["source"], z["temperature"], where=where)
    if cls is LoReFT:
        return cls(site, z["rotation"], z["W"], z["b"], where=where)
    if cls is I.AddVector:
        return cls(site, z["vector"], z["scale"], per_layer=st.get("per_layer", False), where=where)
    if cls is I.AlongDirection:
        return cls(site, z["direction"], z["lo"], z["hi"], per_layer=st.get("per_layer", False), where=where)
    if cls is I.ScaleHeads:
        return cls(z["mask"], site, where=where)
    return cls(site, z["source"], where=where)


# ----------------------------------------------------------------------------- DAS over a grid


@dataclass(frozen=True)
class DASGrid(LayerGrid):
    """Held-out interchange-intervention accuracy per (layer, position) (`values` `[L, P]`), with the controls:
    `random` (IIA of untrained random subspaces, `[n_random, L, P]`: a null per cell) and `shuffled` (IIA
    after training on shuffled counterfactual labels, `[L, P]`; None unless asked), the trained bases
    `[L, P, D, k]` and `n_test`."""

    random: np.ndarray | None = None
    shuffled: np.ndarray | None = None
    bases: np.ndarray | None = None
    positions: tuple[int, ...] = ()
    layers: tuple[int, ...] = ()
    n_test: int = 0

    column = "position"
    _title = "DASGrid"

    def row_labels(self) -> list[str]:
        return [str(l) for l in self.layers] or super().row_labels()

    def column_labels(self) -> list[str]:
        return [str(p) for p in self.positions] or super().column_labels()

    def above_null(self, q: float = 0.95) -> np.ndarray:
        """`[L, P]` bool: cells whose IIA exceeds the `q` quantile of their own random-subspace null."""
        if self.random is None:
            raise InputError("this grid was trained without random-subspace controls (n_random=0)")
        return self.values > np.quantile(self.random, q, axis=0)


class _Cell(Intervention):
    """One grid cell's interchange at a traced (layer, position): vmapped over cells by `das_grid`."""

    site: str = eqx.field(static=True)
    basis: Float[Array, "D k"]
    source: Float[Array, "L B T D"]
    layer: Int[Array, ""]
    position: Int[Array, ""]
    where: Where

    def edit(self, value, ctx):
        idx = real_index(ctx.attention_mask, self.position[None])  # [B, 1]
        at = (jnp.arange(value.shape[1])[None, :] == idx) & (ctx.layer == self.layer)  # [B, T]
        return jnp.where(at[..., None], interchange(value, self.source[ctx.layer], self.basis), value)


def das_grid(model, base, source, cf_labels, candidates, *, layers: Sequence[int], positions: Sequence[int],
             k: int = 1, site: str = "resid_post", steps: int = 200, lr: float = 1e-2, test_frac: float = 0.25,
             patience: int = 50, n_random: int = 16, shuffled_control: bool = False, seed: int = 0,
             mesh: Mesh | None = None, axis: str = "data") -> DASGrid:
    """Train a DAS subspace of dimension `k` at every (layer, position) of the grid, in one compiled call.

    `base` and `source` are `(tokens, mask)` of N paired prompts (row i of each is one pair; same length);
    `cf_labels` `[N]` is the counterfactual answer (an index into `candidates`, the token ids of the possible
    answers) the base run should give when the causal variable is taken from the source run. Each cell's
    basis is trained with Adam on the cross-entropy over `candidates` at the last position, pairs split into
    train and test by pair; early stopping keeps each cell's parameters at its best train loss after
    `patience` steps without improvement. Returns the held-out IIA with its controls (`DASGrid`).

    With a `mesh`, the grid's cells are split over its `axis` (padded to a multiple of its size with copies of the
    last cell, dropped after): each device trains its own cells, the model and the pairs replicated on every device
    (a model already loaded onto that mesh is used as it is). The result equals the single-device one."""
    (bt, bm), (st, sm) = (tuple(np.asarray(x) for x in base), tuple(np.asarray(x) for x in source))
    cf = np.asarray(cf_labels)
    cand = jnp.asarray(np.asarray(candidates, np.int32))
    N = bt.shape[0]
    if st.shape != bt.shape or cf.shape != (N,):
        raise InputError(f"das_grid: base {bt.shape}, source {st.shape} and cf_labels {cf.shape} must be N pairs of "
                         "one length")
    if not (0 <= cf.min() and cf.max() < len(cand)):
        raise InputError(f"das_grid: cf_labels must index candidates (0..{len(cand) - 1}), got {cf.min()}..{cf.max()}")
    if not 1 <= k <= model.cfg.d_model:
        raise InputError(f"das_grid: k must be in [1, d_model={model.cfg.d_model}], got {k}")
    layers, positions = tuple(int(l) for l in layers), tuple(int(p) for p in positions)
    for l in layers:
        if not 0 <= l < model.cfg.n_layers:
            raise InputError(f"das_grid: layer {l} outside 0..{model.cfg.n_layers - 1}")
    check_positions("das_grid: positions", np.asarray(positions), row_lengths(bm), bt.shape[1])
    rng = np.random.default_rng(seed)
    order = rng.permutation(N)
    n_test = max(1, int(round(test_frac * N)))
    test, train = order[:n_test], order[n_test:]
    if len(train) < 1:
        raise InputError(f"das_grid: {N} pairs leave none to train on with test_frac={test_frac}")
    if mesh is not None and axis not in mesh.axis_names:
        raise InputError(f"das_grid: axis {axis!r} is not an axis of the mesh ({', '.join(mesh.axis_names)})")
    cache = models.forward(model, st, sm, capture=(site,)).acts[site]  # [L, N, T, D], the source run
    L, P, D = len(layers), len(positions), model.cfg.d_model
    n_cells = L * P
    pad = 0 if mesh is None else -n_cells % mesh.shape[axis]
    cell_l = jnp.repeat(jnp.asarray(layers, jnp.int32), P)
    cell_p = jnp.tile(jnp.asarray(positions, jnp.int32), L)
    key = jax.random.key(seed)
    init = jax.random.normal(key, (n_cells, D, k))
    params, static_fwd = model.params, model.cfg
    cells = lambda x: x  # noqa: E731 (without a mesh: the arrays as they are)
    if mesh is not None:
        split, whole = NamedSharding(mesh, PartitionSpec(axis)), NamedSharding(mesh, PartitionSpec())

        def cells(x):  # [cells, ...] padded with copies of the last cell, split over `axis`
            return jax.device_put(jnp.concatenate([x, jnp.repeat(x[-1:], pad, 0)]) if pad else x, split)

        on_mesh = all(isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
                      for x in jax.tree.leaves(params))
        params = params if on_mesh else jax.device_put(params, whole)
        cache = jax.device_put(cache, whole)
        cell_l, cell_p = cells(cell_l), cells(cell_p)

    def logits_at(basis, l, p, rows, src_rows):
        iv = _Cell(site, basis, src_rows, l, p, Where())
        out = models.transformer.forward(params, static_fwd, jnp.asarray(bt)[rows], jnp.asarray(bm)[rows],
                                         interventions=(iv,)).logits
        return out[:, -1][:, cand].astype(jnp.float32)  # left-padded: the last column is every row's last token

    def loss_fn(basis, l, p, rows, labels):
        lg = logits_at(basis, l, p, rows, cache[:, rows])
        return optax.softmax_cross_entropy_with_integer_labels(lg, labels).mean()

    def iia(basis, l, p, rows, labels):
        return (logits_at(basis, l, p, rows, cache[:, rows]).argmax(-1) == labels).mean()

    opt = optax.adam(lr)

    def train_cell(basis0, l, p, labels):
        tr = jnp.asarray(train)

        def step(carry, _):
            basis, state, best, best_loss, wait = carry
            loss, g = jax.value_and_grad(loss_fn)(basis, l, p, tr, labels[tr])
            upd, state = opt.update(g, state, basis)
            improved = loss < best_loss
            best = jnp.where(improved, basis, best)
            best_loss = jnp.where(improved, loss, best_loss)
            wait = jnp.where(improved, 0, wait + 1)
            basis = jnp.where(wait > patience, basis, optax.apply_updates(basis, upd))  # early stop: frozen
            return (basis, state, best, best_loss, wait), loss

        carry = (basis0, opt.init(basis0), basis0, jnp.inf, 0)
        (_, _, best, _, _), _ = jax.lax.scan(step, carry, None, length=steps)
        return best

    labels = jnp.asarray(cf, jnp.int32)
    if mesh is not None:
        labels = jax.device_put(labels, whole)
    te = jnp.asarray(test)
    train_all = jax.jit(jax.vmap(lambda b, l, p, y: train_cell(b, l, p, y), in_axes=(0, 0, 0, None)))
    eval_all = jax.jit(jax.vmap(lambda b, l, p: iia(b, l, p, te, labels[te]), in_axes=(0, 0, 0)))
    grid = lambda x: np.asarray(x)[:n_cells].reshape(L, P)  # noqa: E731 (padding cells dropped)
    bases = train_all(cells(init), cell_l, cell_p, labels)
    values = grid(eval_all(bases, cell_l, cell_p))
    bases = np.asarray(bases)[:n_cells]
    random = None
    if n_random:
        draws = jax.random.normal(jax.random.fold_in(key, 1), (n_random, n_cells, D, k))
        random = np.stack([grid(eval_all(cells(d), cell_l, cell_p)) for d in draws])
    shuffled = None
    if shuffled_control:
        perm = jnp.asarray(rng.permutation(N))
        sb = train_all(cells(init), cell_l, cell_p, labels[perm])
        shuffled = grid(eval_all(sb, cell_l, cell_p))
    return DASGrid(values, f"DAS IIA (k={k}, {site})", random=random, shuffled=shuffled,
                   bases=np.asarray(jax.vmap(orthonormal)(bases)).reshape(L, P, D, k), positions=positions,
                   layers=layers, n_test=n_test)
