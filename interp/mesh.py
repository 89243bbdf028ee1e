"""Device meshes for sweeps, laid out by the one table in `models.sharding.RULES`.

By default the sweep axis (interventions) is split over the mesh's `"data"` axis and parameters over its
`"model"` axis (tensor parallel); the prompt batch is split too when the rules map `"batch"` to another
mesh axis than `"sweep"`, e.g. `rules=(("sweep", "data"), ("batch", "model"))`. The same code runs on one
CPU, 8 simulated CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`), a GPU node or a
multi-host TPU/GPU slice: after `initialize()` on every host, `sweep_mesh()` spans the global devices and
`put` builds global arrays from the (identical) host-local inputs, each host feeding its own shards.
"""

from __future__ import annotations

import os
from typing import Sequence

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.params import logical_axes
from models.sharding import RULES, partition_spec

__all__ = ["P", "initialize", "place_params", "put", "replicate", "spec", "sweep_mesh", "sweep_size"]


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


def _rules(rules):
    return RULES if rules is None else rules


def spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=None) -> P:
    """The PartitionSpec of an array with these logical axes (`None`: never split) under `rules`
    (default `models.sharding.RULES`)."""
    return partition_spec(tuple(a or "" for a in axes), shape, mesh, _rules(rules))


def sweep_size(mesh: Mesh | None, rules=None) -> int:
    """How many ways the sweep axis is split (1 without a mesh)."""
    axis = dict(_rules(rules)).get("sweep")
    return 1 if mesh is None or axis not in mesh.shape else int(mesh.shape[axis])


def put(x, mesh: Mesh, pspec: P) -> jax.Array:
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
    return jax.tree.map(lambda x: put(x, mesh, P()) if eqx.is_array(x) else x, tree)


def place_params(params, mesh: Mesh, rules=None):
    """Parameters placed by their logical axes (`models.params.logical_axes`), multi-process safe."""
    return jax.tree.map(lambda a, ax: put(a, mesh, spec(ax, a.shape, mesh, rules)), params, logical_axes(params))
