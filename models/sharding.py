"""Logical axis names -> mesh axes, through one table (the only place that says what is sharded how).

Resolution is Flax's logical partitioning (`flax.linen.logical_to_mesh_axes`), so a rules table written for
MaxText or the `gemma` library applies unchanged: pass it as `rules=`, or activate it for a block of code with
`flax.linen.logical_axis_rules(table)`. Rules are in priority order; a mesh value may be one axis, a tuple of
axes or None; a name may have several rules (the first that fits wins).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.params import logical_axes

# (logical axis, mesh axis or None). Tensor-parallel over heads / MLP / vocabulary, data-parallel over batch
# and sweep axes. Edit here (or pass `rules=`) to change the layout everywhere.
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("sweep", "data"),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("features", "model"),
    ("embed", None),
    ("head_dim", None),
    ("layers", None),
    ("ctx", None),
)


def active_rules(rules=None) -> tuple:
    """`rules` if given, else the table of an enclosing `flax.linen.logical_axis_rules(...)`, else `RULES`."""
    if rules is not None:
        return tuple(rules)
    return tuple(nn.get_logical_axis_rules()) or RULES


def _fitting(rules, axes: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh) -> list:
    """The rules restricted to `mesh`, so that the next rule for a name (or replication) applies when one does
    not fit: mesh axes the mesh lacks are dropped from a rule (the rule too if none is left), and so is a rule
    whose mesh axes do not divide the size of the dimension it names."""
    out = []
    for name, target in rules:
        if target is None:
            out.append((name, None))
            continue
        present = tuple(a for a in ((target,) if isinstance(target, str) else target) if a in mesh.shape)
        if not present:
            continue
        if name in axes and shape is not None and shape[axes.index(name)] % math.prod(mesh.shape[a] for a in present):
            continue
        out.append((name, target if isinstance(target, str) else present))
    return out


def partition_spec(axes: Sequence[str], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                   rules=None) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes (None or "" for an axis no rule names), resolved
    by Flax from `active_rules(rules)`; with `mesh`, only rules that fit it apply (see `_fitting`)."""
    axes = tuple(a or None for a in axes)
    table = active_rules(rules)
    if mesh is not None:
        table = _fitting(table, axes, shape, mesh)
    return nn.logical_to_mesh_axes(axes, table)


def shard_params(params: Any, mesh: Mesh, rules=None) -> Any:
    """Place every parameter on `mesh` according to its logical axes (see `models.params.LOGICAL_AXES`)."""
    axes = logical_axes(params)
    return jax.tree.map(
        lambda a, ax: jax.device_put(a, NamedSharding(mesh, partition_spec(ax, a.shape, mesh, rules))),
        params, axes,
    )


def shard_batch(x, mesh: Mesh, rules=None):
    """Place an array whose leading axis is the batch on `mesh` (data-parallel)."""
    return jax.device_put(x, NamedSharding(mesh, partition_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh, rules)))
