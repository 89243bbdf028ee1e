"""Logical axis names -> mesh axes, through one table (the only place that says what is sharded how)."""

from __future__ import annotations

from typing import Any, Sequence

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


def partition_spec(axes: Sequence[str], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                   rules=RULES) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes; an axis whose size the mesh axis does not divide,
    or whose mesh axis is absent from `mesh`, stays replicated."""
    table = dict(rules)
    out = []
    for i, name in enumerate(axes):
        mesh_axis = table.get(name)
        if mesh is not None and mesh_axis is not None:
            if mesh_axis not in mesh.shape or (shape is not None and shape[i] % mesh.shape[mesh_axis]):
                mesh_axis = None
        out.append(mesh_axis)
    return PartitionSpec(*out)


def shard_params(params: Any, mesh: Mesh, rules=RULES) -> Any:
    """Place every parameter on `mesh` according to its logical axes (see `models.params.LOGICAL_AXES`)."""
    axes = logical_axes(params)
    return jax.tree.map(
        lambda a, ax: jax.device_put(a, NamedSharding(mesh, partition_spec(ax, a.shape, mesh, rules))),
        params, axes,
    )


def shard_batch(x, mesh: Mesh, rules=RULES):
    """Place an array whose leading axis is the batch on `mesh` (data-parallel)."""
    return jax.device_put(x, NamedSharding(mesh, partition_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh, rules)))
