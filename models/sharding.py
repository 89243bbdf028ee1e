"""Device meshes and placement: logical axis names -> mesh axes through one table (the only place that says
what is sharded how), and the functions that place parameters, batches and sweeps, on one host or several.

Resolution is Flax's logical partitioning (`flax.linen.logical_to_mesh_axes`), so a rules table written for
MaxText or the `gemma` library applies unchanged: pass it as `rules=`, or activate it for a block of code with
`flax.linen.logical_axis_rules(table)`. Rules are in priority order; a mesh value may be one axis, a tuple of
axes or None; a name may have several rules (the first that fits wins).

The same code runs on one CPU, 8 simulated CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`),
a GPU node or a multi-host TPU/GPU slice: after `initialize()` on every host, `sweep_mesh()` spans the global
devices and `put` builds global arrays from the (identical) host-local inputs, each host feeding its own shards.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import equinox as eqx
import flax.linen as nn
import jax
import numpy as np
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
    ("seq", None),
    ("kv_seq", None),
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


def constrain(x: jax.Array, axes: Sequence[str], rules=None) -> jax.Array:
    """`x` constrained to the sharding of its logical `axes` when a mesh is set (`with jax.set_mesh(mesh):`),
    else `x` unchanged. The forward calls it at every activation site with the site's registry axes, so a
    mesh-sharded forward does not rely on XLA's propagation for its activations."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, partition_spec(axes, x.shape, mesh, rules))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, **kwargs) -> None:
    """`jax.distributed.initialize`, with CPU cross-process collectives (gloo) switched on when on CPU.

    On TPU pods and SLURM / Open MPI GPU clusters call it with no arguments (JAX reads the environment);
    elsewhere pass the coordinator `host:port`, the process count and this process's id (or set
    `INTERP_COORDINATOR`, `INTERP_NUM_PROCESSES`, `INTERP_PROCESS_ID`). Call it before anything runs on a
    device (importing `models`, `interp` or `saes` does not).
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("INTERP_COORDINATOR")
    if num_processes is None and "INTERP_NUM_PROCESSES" in env:
        num_processes = int(env["INTERP_NUM_PROCESSES"])
    if process_id is None and "INTERP_PROCESS_ID" in env:
        process_id = int(env["INTERP_PROCESS_ID"])
    if env.get("JAX_PLATFORMS", "cpu").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


def sweep_mesh(devices=None, model: int = 1) -> Mesh:
    """A `("data", "model")` mesh over `devices` (default: every global device), `model` devices per
    tensor-parallel group; with the default rules sweeps split their items over `"data"`."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    if devices.size % model:
        raise ValueError(f"{devices.size} devices cannot be split into tensor-parallel groups of {model}")
    return Mesh(devices.reshape(-1, model), ("data", "model"))


def sweep_size(mesh: Mesh | None, rules=None) -> int:
    """How many ways the sweep axis is split (1 without a mesh)."""
    axis = dict(active_rules(rules)).get("sweep")
    return 1 if mesh is None or axis not in mesh.shape else int(mesh.shape[axis])


def put(x, mesh: Mesh, pspec: PartitionSpec) -> jax.Array:
    """A global array with `NamedSharding(mesh, pspec)` from a value that every process holds in full."""
    sharding = NamedSharding(mesh, pspec)
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, mesh: Mesh):
    """Every array leaf of `tree` replicated on `mesh` (other leaves untouched)."""
    return jax.tree.map(lambda x: put(x, mesh, PartitionSpec()) if eqx.is_array(x) else x, tree)


def shard_params(params: Any, mesh: Mesh, rules=None) -> Any:
    """Every parameter placed on `mesh` by its logical axes (`models.params.PARAMS`); multi-process safe."""
    return jax.tree.map(lambda a, ax: put(a, mesh, partition_spec(ax, a.shape, mesh, rules)), params,
                        logical_axes(params))


def to_host(x) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one host array, gathered across processes if needed."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def shard_batch(x, mesh: Mesh, rules=None):
    """An array whose leading axis is the batch, split over the mesh axis of `"batch"`; multi-process safe."""
    return put(x, mesh, partition_spec(("batch",) + (None,) * (np.ndim(x) - 1), np.shape(x), mesh, rules))
