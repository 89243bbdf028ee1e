"""Sweeps: a batch of interventions scored by a metric as one compiled program per prefix, on a device mesh.

    effects = head_ablation(model, tokens, mask, LogitDiff(ok, bad), kind="mean")     # [layers, heads]
    patched = activation_patching(model, (clean, clean_mask), (corrupt, corrupt_mask), metric)  # PatchGrid [layers, T]
    approx = attribution_patching(model, (clean, clean_mask), (corrupt, corrupt_mask), metric)  # same, 1 backward
    patched.top(5), patched.table(), patched.plot(path="patching.png")  # labelled by layer and token

Every sweep returns the change of the metric against the run without the swept intervention. The engine
(`sweep`) groups the items by the first layer they can change and resumes each group from the cached
residual entering that layer (`models.forward(..., start_layer=l, resid=...)`): ablating a head in layer l
never recomputes layers < l; by default the groups are merged into the number of compiled programs that
minimises compile + run time for the call (`max_programs="auto"`). Within a group the items run in calls of
about `batch_size` under `jax.vmap` (one program per group, calls of equal size, each call one layer's items
where that costs nothing: `plan_calls`; a progress bar counts them), split over a device mesh
(`models.sharding.sweep_mesh`) as `models.sharding.RULES` lays out the logical `"sweep"` and `"batch"` axes.
The default chunk holds about `CHUNK_TOKENS` tokens of the platform: vmapping hundreds of forwards at once is memory-bound on a CPU (measured 1.9x slower per item than
chunks of 9 on SmolLM2, 8 x 64 tokens).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from interp import progress as progresslib
from interp.grids import ArrayResult, LayerGrid
from interp.heads import HeadGrid
from interp.interventions import (AddVector, Replace, StackedWhere, first_layers, mean_ablation, resample_ablation,
                                  zero_ablation)
from interp.stats import rank_correlation  # re-exported: `sweeps.rank_correlation` as before
from interp.readout import Readout, check_metric, metric_positions, readout_with, run_readout
import models
from models.checks import Extent, check_call, check_index, check_interventions, check_positions, row_lengths
from models.errors import InputError
from models.sharding import RULES, partition_spec, put, replicate, shard_params, sweep_size
from models.sites import SITES, check_site

__all__ = [
    "CHUNK_TOKENS", "LOGIT_BYTES", "PatchGrid", "activation_patching", "attribution_patching", "baseline", "capture",
    "compiled_flops",
    "HeadEffects", "default_batch_size", "head_ablation", "ablation_replacement", "head_ablation_attribution", "one_hot_items",
    "plan_calls", "program_starts", "rank_correlation", "sweep", "sweep_flops",
]

Metric = Callable[[Readout], jax.Array]

# Tokens (items x prompt tokens) one vmapped chunk of a sweep holds by default, per platform.
CHUNK_TOKENS = {"cpu": 4096, "gpu": 65536, "tpu": 65536}
# float32 logits one vmapped call may hold: a chunk of CHUNK_TOKENS tokens over Gemma's 262k vocabulary would be
# 4.3 GB on a CPU (68 GB on an accelerator), so a large vocabulary shrinks the chunk
LOGIT_BYTES = {"cpu": 2**30, "gpu": 2**33, "tpu": 2**33}


def default_batch_size(n_items: int, n_tokens: int, mesh=None, vocab: int | None = None) -> int | None:
    """Items per vmapped chunk of `n_tokens` tokens each: about `CHUNK_TOKENS` tokens and, given the model's
    `vocab`, at most `LOGIT_BYTES` of float32 logits; `None` (all at once) on a mesh or when all fit in one chunk."""
    backend = jax.default_backend()
    per = CHUNK_TOKENS.get(backend, 65536) // max(1, n_tokens)
    if vocab:
        per = min(per, LOGIT_BYTES.get(backend, 2**33) // (4 * max(1, n_tokens) * int(vocab)))
    per = max(1, per)
    return None if mesh is not None or per >= n_items else per


def _inputs(tokens, mask):
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones_like(tokens) if mask is None else jnp.asarray(mask, jnp.int32)
    return tokens, mask


def _check(model, tokens, mask, metric=None, positions=None, base=()) -> None:
    """Concrete checks before anything is traced: token ids, the read positions in every row, the `base`
    interventions and the metric's targets (`models.checks`)."""
    check_call(model.cfg, tokens, mask, (), tuple(base))
    if positions is not None:
        check_positions("positions", np.asarray(positions), row_lengths(mask), int(np.shape(tokens)[1]))
    if metric is not None:
        check_metric(metric, model.cfg, int(np.shape(tokens)[0]))


@eqx.filter_jit
def _capture(model, tokens, mask, site: str, base):
    return models.forward(model, tokens, mask, None, (site,), base).acts[site]


def capture(model, tokens, mask, site: str, base=()) -> jax.Array:
    """One site's activations for every layer (`[L, B, T, ...]`, or `[B, T, ...]` for embed/final_norm)."""
    check_site(site)
    tokens, mask = _inputs(tokens, mask)
    _check(model, tokens, mask, base=base)
    return _capture(model, tokens, mask, site, tuple(base))


@eqx.filter_jit
def _baseline(model, tokens, mask, metric, base, positions):
    return metric(run_readout(model, tokens, mask, base, positions))


def baseline(model, tokens, mask, metric: Metric, base=(), positions="metric") -> float:
    """The metric with only the `base` interventions, read at `positions` (default: the metric's own, see
    `interp.readout.metric_positions`)."""
    tokens, mask = _inputs(tokens, mask)
    positions = metric_positions(metric, positions)
    _check(model, tokens, mask, metric, positions, base)
    return float(_baseline(model, tokens, mask, metric, tuple(base), positions))


@eqx.filter_jit
def _run_group(model, tokens, mask, prefix, items, shared, templates, base, metric, start, positions, out_sharding):
    resid = None if start == 0 else prefix[start - 1]

    def one(item):
        if shared is not None:  # the call's items share their layers: an unbatched lax.cond edits at those only
            item = eqx.tree_at(lambda t: [w.layers for w in _layer_wheres(t)], item, shared)
        if templates is None:
            ivs = tuple(item)
        else:
            ivs = tuple(eqx.tree_at(lambda t: t.where, t, item) for t in templates)
        return metric(run_readout(model, tokens, mask, (*base, *ivs), positions, start_layer=start, resid=resid))

    out = jax.vmap(one)(items)
    return out if out_sharding is None else jax.lax.with_sharding_constraint(out, out_sharding)


def _layer_wheres(items) -> list[StackedWhere]:
    """The `StackedWhere` selections with per-item `layers` in a batch of items (a `StackedWhere`, or a tuple of
    stacked interventions)."""
    nodes = jax.tree.leaves(items, is_leaf=lambda x: isinstance(x, StackedWhere))
    return [w for w in nodes if isinstance(w, StackedWhere) and w.layers is not None]


def _call_size(runs: Sequence[int], cap: int | None, k: int) -> int:
    """Items per call of a group whose runs have these lengths: each run in `round(r / cap)` calls (at least
    one) of about equal size, so a run of 9 with a cap of 8 is one call of 9, not 8 + 1 padded to 8; a multiple of
    the mesh's sweep size `k`."""
    size = max(-(-r // max(1, round(r / cap))) if cap else r for r in runs)
    return -(-size // k) * k


def _group_calls(runs: list[np.ndarray], cap: int | None, k: int) -> tuple[int, list[np.ndarray]]:
    size = _call_size([len(r) for r in runs], cap, k)
    return size, [r[lo:lo + size] for r in runs for lo in range(0, len(r), size)]


def plan_calls(starts: np.ndarray, keys: np.ndarray | None, cap: int | None, k: int = 1
               ) -> list[tuple[int, int, bool, list[np.ndarray]]]:
    """How a sweep runs its items: per program (distinct start layer), `(start, items per call, shared,
    [item indices of each call])`. `keys [N, n]` are the items' layers (None: not stacked): when splitting a
    group into runs of items with equal layers costs no more padded items and no more calls, every call holds
    one run (`shared`: its layers are passed unbatched, so `Intervention.apply`'s `lax.cond` stays a branch and
    the edit runs at those layers only; under a batched predicate it would be a select evaluating the edit at
    every layer). `cap`: items per call (None: no limit); `k`: the call size is a multiple of it (the mesh)."""
    plan = []
    for s in np.unique(starts):
        idx = np.nonzero(starts == s)[0]
        size, calls = _group_calls([idx], cap, k)
        shared = False
        if keys is not None:
            order = idx[np.lexsort(keys[idx].T[::-1])]  # stable: by layers, then item order
            cut = np.nonzero((np.diff(keys[order], axis=0) != 0).any(1))[0] + 1
            split_size, split = _group_calls(np.split(order, cut), cap, k)
            if len(split) * split_size <= len(calls) * size and len(split) <= len(calls):
                size, calls, shared = split_size, split, True
        plan.append((int(s), size, shared, calls))
    return plan


# Cost model of one sweep call on each platform: seconds to compile one group's program, and layer-token-items
# run per second. CPU: SmolLM2's 270-head sweep on 2 cores (bench.sweeps at 8x64, bench.latency at 1x14,
# 2026-12-08): 0.4-0.8 s per extra program, 2.6e4-2.9e4 layer-token-items/s.
COMPILE_S = {"cpu": 0.7, "gpu": 3.0, "tpu": 3.0}
LAYER_TOKENS_PER_S = {"cpu": 2.7e4, "gpu": 2.0e6, "tpu": 2.0e6}


def _bucket_starts(first: np.ndarray, groups: int) -> np.ndarray:
    uniq = np.unique(first)
    lows = {int(v): int(chunk[0]) for chunk in np.array_split(uniq, groups) for v in chunk}
    return np.asarray([lows[int(f)] for f in first])


def program_starts(first: np.ndarray, max_programs: int | str | None, n_layers: int = 1, n_tokens: int = 1,
            scale: float = 1.0) -> np.ndarray:
    """Each item's start layer: its first layer (`max_programs=None`: one program per distinct first layer),
    the start of its bucket when at most `max_programs` programs are wanted, or with `"auto"` the number of
    programs that minimises the estimated compile + run time (`COMPILE_S`, `LAYER_TOKENS_PER_S`; `scale`
    is the model's per-layer cost relative to SmolLM2-135M)."""
    uniq = np.unique(first)
    if max_programs == "auto":
        backend = jax.default_backend()
        compile_s, rate = COMPILE_S.get(backend, 3.0), LAYER_TOKENS_PER_S.get(backend, 2.0e6) / scale

        def cost(g):
            return g * compile_s + np.sum(n_layers - _bucket_starts(first, g)) * n_tokens / rate

        max_programs = min(range(1, len(uniq) + 1), key=cost)
    if max_programs is None or max_programs >= len(uniq):
        return first
    if isinstance(max_programs, bool) or not isinstance(max_programs, (int, np.integer)) or max_programs < 1:
        raise InputError(f"max_programs must be an integer >= 1, None (one per first layer) or 'auto', "
                         f"got {max_programs!r}")
    return _bucket_starts(first, int(max_programs))


def _layer_scale(cfg) -> float:
    """Parameters of one layer relative to SmolLM2-135M's (the cost model's unit)."""
    attn = cfg.d_model * cfg.d_head * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    return (attn + (3 if cfg.gated_mlp else 2) * cfg.d_model * cfg.d_mlp) / 3.54e6


def _prepare(model, tokens, mask, metric, interventions, where, base, positions, mesh, batch_size, max_programs,
             first, rules):
    """Checks and plans a `sweep`: (N items, programs, an iterator of (item indices, `_run_group` arguments)
    per call)."""
    tokens, mask = _inputs(tokens, mask)
    base, positions, rules = tuple(base), metric_positions(metric, positions), rules or RULES
    _check(model, tokens, mask, metric, positions, base)
    cfg, L = model.cfg, model.cfg.n_layers
    ext = Extent(cfg, tokens.shape[1], row_lengths(mask), stacked=True)
    if where is None:
        items, templates = tuple(interventions), None
        n = int(jax.tree.leaves(items)[0].shape[0])
        check_interventions(items, ext)
        firsts = [first_layers(iv, n, L) for iv in items]
    else:
        if not isinstance(where, StackedWhere):
            raise InputError(f"sweep(where=...) takes a StackedWhere (interp.interventions.stack([Where(...), ...])), "
                             f"got {type(where).__name__}")
        items, templates = where, tuple(interventions)
        n = int(jax.tree.leaves(where)[0].shape[0])
        check_interventions(templates, ext._replace(stacked=False))
        for t in templates:
            where.validate(t.site, ext, f"sweep(where=...) for {type(t).__name__}({t.site!r}): ")
        wf = first_layers(where, n, L)
        firsts = [wf if SITES[t.site].per_layer else np.zeros(n, np.int64) for t in templates]
    firsts = np.asarray(first) if first is not None else np.min(np.stack(firsts), 0)
    starts = program_starts(firsts.astype(np.int64), max_programs, L, tokens.size, _layer_scale(cfg))

    out_sharding, item_spec = None, None
    k = sweep_size(mesh, rules)
    if mesh is not None:
        item_spec = partition_spec(("sweep",), (k,), mesh, rules)
        batch = partition_spec(("batch",), tokens.shape[:1], mesh, rules)
        if set(batch) & set(item_spec) - {None}:
            batch = P()  # the sweep already uses that mesh axis
        model = model.replace_params(shard_params(model.params, mesh, rules))
        base, metric, templates = replicate((base, metric, templates), mesh)
        tokens, mask = put(tokens, mesh, batch), put(mask, mesh, batch)
        out_sharding = NamedSharding(mesh, P())
    prefix = None
    if starts.max() > 0:
        prefix = _capture(model, tokens, mask, "resid_post", base)

    wheres = _layer_wheres(items)
    layers = [np.asarray(w.layers).reshape(n, -1) for w in wheres]
    keys = np.concatenate(layers, 1) if layers else None
    cap = default_batch_size(n, tokens.size, mesh, model.cfg.vocab_size) if batch_size is None else (batch_size or None)
    plan = plan_calls(starts, keys, cap, k)

    def calls():
        for s, size, shared, parts in plan:
            for part in parts:
                sel = np.concatenate([part, np.repeat(part[:1], size - len(part))])  # one shape per group: one program
                sub = jax.tree.map(lambda x: jnp.asarray(x)[sel], items)
                common = [jnp.asarray(a[part[0]]) for a in layers] if shared else None
                if mesh is not None:
                    sub, common = jax.tree.map(lambda x: put(x, mesh, item_spec), sub), replicate(common, mesh)
                yield part, (model, tokens, mask, prefix, sub, common, templates, base, metric, s, positions,
                             out_sharding)

    return n, len(plan), calls()


def sweep(model, tokens, mask, metric: Metric, interventions, *, where: StackedWhere | None = None, base=(),
          positions: Sequence[int] | None | str = "metric", mesh=None, batch_size: int | None = None,
          max_programs: int | str | None = "auto", first: Sequence[int] | None = None, rules=None,
          progress: bool | None = None) -> np.ndarray:
    """The metric under each of N interventions, `[N]` (`[N, ...]` for a metric returning an array; not differenced).

    Either `interventions` is a tuple of stacked interventions (every array leaf with a leading axis N, see
    `interp.interventions.stack`) and item i applies the i-th of each, or `where` is a `StackedWhere` [N]
    (`stack([Where(...), ...])`) and item i applies the (unstacked) `interventions` with their `where` replaced
    by its i-th entry (a mean or a cache is then shared, not copied N times). `base` interventions apply to
    every item. Every item is checked against the model first (InputError naming a bad layer, head, position).

    `positions` are what the metric reads: the `p`-th real token of each row (`None`: all; default `"metric"`:
    the metric's own `positions`, e.g. every position for `NextTokenLoss`, else the last token). `first[i]`
    (default: inferred from the layers/heads selections) is the first layer item i can change; items are
    grouped by it and resume from the cached residual. Each group is one compiled program: `max_programs`
    caps their number (fewer compilations, some recomputation; `None`: one per distinct first layer; the
    default `"auto"` picks the number that minimises the estimated compile + run time, see `program_starts`).
    With a `mesh` (`models.sharding.sweep_mesh`), items are split over the mesh axis that `rules` (default
    `models.sharding.RULES`) gives `"sweep"`, parameters by their logical axes, the prompt batch by `"batch"`.
    `batch_size`: items per vmapped call, about (default `default_batch_size`; `0`: no limit); calls hold items
    of one layer selection where that costs no extra calls (`plan_calls`), so each edit runs at its layers only.
    `progress`: a tqdm bar over the items (default on unless `INTERP_PROGRESS=0`; shown after a few seconds).
    `sweep_flops` counts what the same call computes.
    """
    n, programs, calls = _prepare(model, tokens, mask, metric, interventions, where, base, positions, mesh,
                                  batch_size, max_programs, first, rules)
    values = None
    with progresslib.bar(n, f"sweep ({programs} program{'s' * (programs > 1)})", progress) as bar:
        for part, args in calls:
            vals = np.asarray(_run_group(*args))[: len(part)]
            values = np.zeros((n, *vals.shape[1:]), np.float64) if values is None else values
            values[part] = vals
            bar.update(len(part))
    return values


def sweep_flops(model, tokens, mask, metric: Metric, interventions, *, where: StackedWhere | None = None, base=(),
                positions: Sequence[int] | None | str = "metric", mesh=None, batch_size: int | None = None,
                max_programs: int | str | None = "auto", first: Sequence[int] | None = None, rules=None,
                branch: str = "max") -> float:
    """Matmul FLOPs of the programs the same `sweep` call runs, summed over its calls (`compiled_flops(program,
    branch)` of each, compiled but not run; the shared prefix forward not included). Compare with the items'
    own forwards from their first layers to see what grouping, chunking and padding cost."""
    _, _, calls = _prepare(model, tokens, mask, metric, interventions, where, base, positions, mesh, batch_size,
                           max_programs, first, rules)
    total, seen = 0.0, {}
    for _, args in calls:
        key = (args[9], jax.tree.structure(args[4:6]), tuple(x.shape for x in jax.tree.leaves(args[4])))
        if key not in seen:
            seen[key] = compiled_flops(_run_group.lower(*args).lowered.compile(), branch)
        total += seen[key]
    return total


_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\(.*?\)|[^\s{]+)(?:\{[^}]*\})? ([\w-]+)\((.*)$")


def _dims(shape: str) -> list[int]:
    m = re.search(r"\[([^\]]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def compiled_flops(compiled, branch: str = "max") -> float:
    """Matmul FLOPs (`2 * output size * contracted size` of every `dot`) of a compiled XLA program (a
    `jax.stages.Compiled`, equinox's, or its HLO text), each while loop (a `lax.scan` over layers) counted
    `known_trip_count` times. A conditional counts its costliest branch each time it runs (`branch="max"`: an
    upper bound) or its cheapest (`"min"`: what runs whichever branch is taken, e.g. an edit restricted to
    some layers by a `lax.cond` in the layer scan counts nothing; evaluated at every layer, as a select, it
    counts at each). XLA's `cost_analysis()` counts a loop body once, so it cannot compare a layer scan of 3
    layers with one of 30."""
    if branch not in ("max", "min"):
        raise InputError(f"compiled_flops: branch must be 'max' or 'min', got {branch!r}")
    pick = max if branch == "max" else min
    text = compiled if isinstance(compiled, str) else getattr(compiled, "compiled", compiled).as_text()
    comps, entry, cur = {}, None, None
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            cur = comps.setdefault(m.group(2), [])
            entry = m.group(2) if m.group(1) else entry
        elif line.strip() == "}":
            cur = None
        elif cur is not None:
            cur.append(line)
    if entry is None:
        raise InputError("compiled_flops: no ENTRY computation in the HLO text (pass a compiled program)")
    memo: dict[str, float] = {}

    def cost(name: str) -> float:
        if name not in memo:
            shapes, total = {}, 0.0
            for line in comps[name]:
                m = _INSTRUCTION.match(line)
                if not m:
                    continue
                out, shape, op, rest = m.groups()
                shapes[out] = shape
                if op == "dot":
                    lhs = _dims(shapes[re.match(r"%([^,\s)]+)", rest).group(1)])
                    contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
                    total += 2.0 * np.prod(_dims(shape)) * np.prod([lhs[int(i)] for i in contracted.split(",") if i])
                elif op == "while":
                    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
                    if trips is None:
                        raise InputError(f"compiled_flops: while loop {out} has no known trip count; its FLOPs are unknown")
                    total += int(trips.group(1)) * cost(re.search(r"body=%([\w.-]+)", rest).group(1))
                elif op == "conditional":
                    names = re.findall(r"%([\w.-]+)", rest.split("computation", 1)[-1])
                    total += pick((cost(b) for b in names if b in comps), default=0.0)
                else:
                    total += sum(cost(c) for c in re.findall(r"calls=%([\w.-]+)", rest))
            memo[name] = total
        return memo[name]

    return cost(entry)


# ----------------------------------------------------------------------------- head ablation


def one_hot_items(n_layers: int, n: int, field: str, layers: Sequence[int] | None = None) -> StackedWhere:
    """`len(layers) * n` items (default every one of the `n_layers`), layer-major: item (l, j) selects layer l and
    index j of `field` (heads or tokens)."""
    layers = np.arange(n_layers) if layers is None else _chosen_layers(layers, n_layers)
    return StackedWhere(layers=np.repeat(layers, n)[:, None], **{field: np.tile(np.eye(n, dtype=bool), (len(layers), 1))})


def _chosen_layers(layers, n_layers: int) -> np.ndarray:
    a = np.asarray(layers).reshape(-1)
    if a.size == 0 or not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"layers={layers!r} must be a non-empty sequence of integer layer indices in 0..{n_layers - 1}")
    check_index("layers", a, n_layers, f"a model of {n_layers} layers")
    return a.astype(np.int64)


def ablation_replacement(model, tokens, mask, kind: str, reference, key) -> tuple[Replace, jax.Array, jax.Array | float]:
    """(the attn.z replacement, the clean z [L, B, T, H, d], what each head is replaced by)."""
    z = capture(model, tokens, mask, "attn.z")
    if kind == "zero":
        iv = zero_ablation("attn.z")
    elif kind == "mean":
        ref_t, ref_m = (tokens, mask) if reference is None else _inputs(*reference)
        ref_z = z if reference is None else capture(model, ref_t, ref_m, "attn.z")
        iv = mean_ablation("attn.z", ref_z, ref_m, over_positions=ref_z.shape[2] != z.shape[2])
    elif kind == "resample":
        if reference is None:
            iv = resample_ablation("attn.z", z, key)
        else:
            ref_z = capture(model, *_inputs(*reference), "attn.z")
            if ref_z.shape != z.shape:
                raise InputError(f"resample reference must match the prompts' shape: {ref_z.shape[1:3]} != {z.shape[1:3]}")
            iv = Replace("attn.z", ref_z)
    else:
        raise InputError(f"kind must be 'zero', 'mean' or 'resample', got {kind!r}")
    if kind != "zero" and _replaces_nothing(iv.source, z, mask):
        rows = int(np.shape(tokens)[0])
        what = (f"a one-prompt batch ({rows} row)" if rows == 1 else f"the {rows} rows, which are identical,") \
            if reference is None else "reference=, which holds the same prompts as the input,"
        how = "averaged over the reference prompts (per position)" if kind == "mean" else "on another reference prompt"
        raise InputError(f"head_ablation(kind={kind!r}): each head would be replaced by its output {how}, and with "
                         f"{what} that is its own output: every effect would be float noise. Pass reference=(tokens, "
                         "mask) of other prompts (several for a mean; a prompt of another length gives a mean over "
                         "positions), a batch of different prompts, or kind='zero'")
    return iv, z, iv.source


@eqx.filter_jit
def _replaces_nothing(source, z, mask) -> jax.Array:
    """Whether the replacement equals the clean activation at every real token, up to float rounding."""
    real = mask.astype(bool)[None, :, :, None, None]
    diff = jnp.max(jnp.where(real, jnp.abs(jnp.broadcast_to(source, z.shape) - z), 0.0))
    return diff <= 1e-5 * jnp.maximum(jnp.max(jnp.abs(jnp.where(real, z, 0.0))), 1e-30)


class HeadEffects(ArrayResult, HeadGrid):
    """The `[layers, heads]` result of `head_ablation` / `head_ablation_attribution`: an `interp.heads.HeadGrid`
    (`top(k)` with `L3H1` labels, `table`, a labelled `plot`, a one-line `repr`) that also computes as its float64
    array (`interp.grids.ArrayResult`): operators and ufuncs give numpy arrays (`a - b`, `np.abs(a)`), and ndarray
    methods and attributes (`ravel`, `tolist`, `max`, `dtype`, ...) are the array's."""


def _metric_name(metric) -> str:
    name = getattr(metric, "name", None) or getattr(metric, "__name__", None) or type(metric).__name__
    return name if isinstance(name, str) else type(metric).__name__


def head_ablation(model, tokens, mask, metric: Metric, kind: str = "zero", reference=None, *, key=None,
                  positions="metric", mesh=None, batch_size=None, max_programs="auto", rules=None,
                  progress=None) -> HeadEffects:
    """Change of `metric` when each head is ablated alone, `[layers, heads]` (a `HeadEffects`: a labelled
    `HeadGrid` that computes as its array), in one call (`sweep` options).

    kind: "zero"; "mean" (the head's mean over the `reference` prompts, default these prompts, per position
    when the lengths match); "resample" (the head's output on `reference` prompts of the same shape, default
    another prompt of the batch, or a random one with `key`). A mean or resample that would replace each head
    by its own output (a one-prompt batch as its own reference, identical prompts) is an InputError.
    """
    tokens, mask = _inputs(tokens, mask)
    cfg = model.cfg
    positions = metric_positions(metric, positions)
    _check(model, tokens, mask, metric, positions)
    template, _, _ = ablation_replacement(model, tokens, mask, kind, reference, key)
    values = sweep(model, tokens, mask, metric, (template,), where=one_hot_items(cfg.n_layers, cfg.n_heads, "heads"),
                   positions=positions, mesh=mesh, batch_size=batch_size, max_programs=max_programs, rules=rules,
                   progress=progress)
    effects = np.asarray(values.reshape(cfg.n_layers, cfg.n_heads) - baseline(model, tokens, mask, metric,
                                                                             positions=positions))
    return HeadEffects(effects, name=f"{kind} ablation of {_metric_name(metric)}")


# ----------------------------------------------------------------------------- activation patching


def _pair(clean, corrupt):
    clean, corrupt = _inputs(*clean), _inputs(*corrupt)
    if clean[0].shape != corrupt[0].shape:
        raise InputError(f"clean and corrupt prompts must have the same shape: {clean[0].shape} != {corrupt[0].shape}")
    return clean, corrupt


def _per_axis(site: str, per: str) -> tuple[str, str]:
    """(`Where` field, site axis) that one item selects."""
    if not check_site(site).per_layer:
        raise InputError(f"patching sweeps need a layer site, not {site!r}")
    if per == "position":
        return "tokens", "seq"
    if per == "head":
        axes = SITES[site].axes
        return "heads", "heads" if "heads" in axes else "kv_heads"
    raise InputError(f"per must be 'position' or 'head', got {per!r}")


@dataclass(frozen=True, eq=False, repr=False)  # the one-line repr of LayerGrid
class PatchGrid(ArrayResult, LayerGrid):
    """The result of `activation_patching` / `attribution_patching`: the change of the metric for each (layer,
    position) or (layer, head), `[layers, T]` or `[layers, heads]` float64, labelled. An `interp.grids.LayerGrid`
    (`top(k)`, `table(k)`, `plot()` / `heatmap()` with token labels on the x axis, a one-line `repr`) that computes
    as its array (`interp.grids.ArrayResult`: `g[l, t]`, `g.shape`, `np.asarray(g)`, `g - h`, `g.ravel()`).

    `layers`: the model layer of each row. `tokens` (per position): each column's token text (the clean prompt's,
    row 0; `"clean→corrupt"` where the corrupt prompt's differs; `"<pad>"` on padding), empty without a
    tokenizer. `per`: `"position"` or `"head"`."""

    layers: tuple[int, ...] = ()
    tokens: tuple[str, ...] = ()
    per: str = "position"

    _title = "PatchGrid"

    def __post_init__(self):
        super().__post_init__()
        L, C = self.shape
        if self.per not in ("position", "head"):
            raise InputError(f"PatchGrid per must be 'position' or 'head', got {self.per!r}")
        layers = tuple(range(L)) if not len(self.layers) else tuple(int(l) for l in self.layers)
        if len(layers) != L:
            raise InputError(f"PatchGrid layers names {len(layers)} layers for {L} rows")
        tokens = tuple(str(t) for t in self.tokens)
        if tokens and (self.per != "position" or len(tokens) != C):
            raise InputError(f"PatchGrid tokens label positions: one per column ({C}), per='position'; got "
                             f"{len(tokens)} with per={self.per!r}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "tokens", tokens)

    @property
    def column(self) -> str:
        return self.per

    def row_labels(self) -> list[str]:
        return [str(l) for l in self.layers]

    def column_labels(self) -> list[str]:
        if not self.tokens:
            return [str(j) for j in range(self.shape[1])]
        return [f"{j} {t!r}" for j, t in enumerate(self.tokens)]

    def cell_label(self, i: int, j: int) -> str:
        if self.per == "head":
            return f"L{self.layers[i]}H{j}"
        return f"L{self.layers[i]} @{j}" + (f" {self.tokens[j]!r}" if self.tokens else "")


def _position_tokens(model, clean, corrupt) -> tuple[str, ...]:
    """Each position's token text in row 0 (`"clean→corrupt"` where they differ, `"<pad>"` on padding); `()`
    without a tokenizer."""
    tok = getattr(model, "tokenizer", None)
    if tok is None or not hasattr(tok, "decode"):
        return ()
    (ct, cm), (xt, xm) = ((np.asarray(t)[0], np.asarray(m)[0]) for t, m in (clean, corrupt))
    text = lambda i: tok.decode([int(i)], skip_special=False)
    out = []
    for c, x, cr, xr in zip(ct, xt, cm > 0, xm > 0):
        a, b = (text(c) if cr else "<pad>"), (text(x) if xr else "<pad>")
        out.append(a if a == b else f"{a}→{b}")
    return tuple(out)


def activation_patching(model, clean, corrupt, metric: Metric, *, site: str = "resid_pre", per: str = "position",
                        layers: Sequence[int] | None = None, positions="metric", mesh=None, batch_size=None,
                        max_programs="auto", rules=None, progress=None) -> PatchGrid:
    """Patch `site` from the clean run into the corrupt run at each (layer, position) or (layer, head), one at
    a time: the change of `metric` against the corrupt run, a `PatchGrid` of `[layers, T]` or `[layers, heads]`
    (T = the sequence length, padding included), row i for `layers[i]` (default every layer; `layers=(6, 12)`
    patches those two only), with the positions' token texts when the model has a tokenizer.
    `clean` and `corrupt` are `(tokens, mask)` of the same shape."""
    (ct, cm), (xt, xm) = _pair(clean, corrupt)
    field, axis = _per_axis(site, per)
    L = model.cfg.n_layers
    chosen = np.arange(L) if layers is None else _chosen_layers(layers, L)
    cache = capture(model, ct, cm, site)
    n = cache.shape[1 + SITES[site].axes.index(axis)]
    values = sweep(model, xt, xm, metric, (Replace(site, cache),), where=one_hot_items(L, n, field, chosen),
                   positions=positions, mesh=mesh, batch_size=batch_size, max_programs=max_programs, rules=rules,
                   progress=progress)
    values = np.asarray(values.reshape(len(chosen), n) - baseline(model, xt, xm, metric, positions=positions))
    return PatchGrid(values, name=f"{site} patching of {_metric_name(metric)}", layers=tuple(chosen.tolist()),
                     tokens=_position_tokens(model, (ct, cm), (xt, xm)) if per == "position" else (), per=per)


# ----------------------------------------------------------------------------- attribution patching


@eqx.filter_jit
def _site_grad(model, tokens, mask, metric, site: str, positions):
    """(activation [L, B, T, ...], d metric / d activation) at every layer of `site`, one forward + backward."""

    def run(delta):
        r, acts = readout_with(model, tokens, mask, (AddVector(site, delta, per_layer=True),), positions, (site,))
        return metric(r), acts[site]

    shape = jax.eval_shape(lambda: models.forward(model, tokens, mask, None, (site,)).acts[site])
    return jax.grad(run, has_aux=True)(jnp.zeros(shape.shape, jnp.float32))[::-1]


def _reduce(contrib: jax.Array, site: str, axis: str) -> np.ndarray:
    """Sum a `[L, B, ...]` attribution over everything but the layer and the site's `axis`."""
    names = ("layers",) + SITES[site].axes
    keep = names.index(axis)
    other = tuple(i for i in range(contrib.ndim) if i not in (0, keep))
    return np.asarray(jnp.sum(contrib, other))


def attribution_patching(model, clean, corrupt, metric: Metric, *, site: str = "resid_pre", per: str = "position",
                         positions="metric") -> PatchGrid:
    """Gradient estimate of `activation_patching`: `(clean - corrupt) . d metric / d act` at the corrupt run,
    for every (layer, position) or (layer, head) from one clean forward and one corrupt forward + backward; a
    `PatchGrid` `[layers, T]` or `[layers, heads]` as `activation_patching` gives."""
    (ct, cm), (xt, xm) = _pair(clean, corrupt)
    _, axis = _per_axis(site, per)
    positions = metric_positions(metric, positions)
    _check(model, xt, xm, metric, positions)
    act, grad = _site_grad(model, xt, xm, metric, site, positions)
    est = _reduce((capture(model, ct, cm, site) - act) * grad, site, axis)
    return PatchGrid(est, name=f"{site} patching of {_metric_name(metric)} (attribution estimate)", per=per,
                     tokens=_position_tokens(model, (ct, cm), (xt, xm)) if per == "position" else ())


def head_ablation_attribution(model, tokens, mask, metric: Metric, kind: str = "zero", reference=None, *, key=None,
                              positions="metric") -> HeadEffects:
    """Gradient estimate of `head_ablation`, `[layers, heads]` (a `HeadEffects`): `(replacement - z) . d metric
    / d z`."""
    tokens, mask = _inputs(tokens, mask)
    positions = metric_positions(metric, positions)
    _check(model, tokens, mask, metric, positions)
    _, _, source = ablation_replacement(model, tokens, mask, kind, reference, key)
    z, grad = _site_grad(model, tokens, mask, metric, "attn.z", positions)
    est = _reduce((jnp.broadcast_to(source, z.shape) - z) * grad, "attn.z", "heads")
    return HeadEffects(est, name=f"{kind} ablation of {_metric_name(metric)} (attribution estimate)")
