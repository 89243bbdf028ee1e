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
import warnings
from typing import Any, Iterable, Sequence

import equinox as eqx
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.errors import InputError
from models.params import axis_sizes, logical_axes, param_axes

INDIVISIBLE = ("warn", "error", "ignore")  # what `shard_params` / `sweep_mesh(cfg=)` do with an axis left unsplit


class IndivisibleWarning(UserWarning):
    """A dimension a rule would split over a mesh axis is replicated because the axis size does not divide it."""

# (logical axis, mesh axis or None). Tensor-parallel over heads / MLP / vocabulary, data-parallel over batch
# and sweep axes. Edit here (or pass `rules=`) to change the layout everywhere.
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("sweep", "data"),
    ("vocab", "model"),
    ("expert", "model"),  # expert parallelism first: a mixture's experts split over the tensor-parallel axis
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
               process_id: int | None = None, **kwargs) -> bool:
    """`jax.distributed.initialize`, with CPU cross-process collectives (gloo) switched on when on CPU; on a
    single host a no-op, so one script runs on a laptop and on a pod. Returns whether it initialised.

    On TPU pods and SLURM / Open MPI GPU clusters call it with no arguments (JAX reads the environment);
    elsewhere pass the coordinator `host:port`, the process count and this process's id (or set
    `INTERP_COORDINATOR`, `INTERP_NUM_PROCESSES`, `INTERP_PROCESS_ID`). With none of these and no cluster
    environment (or `num_processes=1`) there is one process: nothing to initialise, False is returned. A process
    count above 1 without a coordinator is an InputError naming what is missing. Call it before anything runs on
    a device (importing `models`, `interp` or `saes` does not).
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("INTERP_COORDINATOR")
    if num_processes is None and "INTERP_NUM_PROCESSES" in env:
        num_processes = int(env["INTERP_NUM_PROCESSES"])
    if process_id is None and "INTERP_PROCESS_ID" in env:
        process_id = int(env["INTERP_PROCESS_ID"])
    if num_processes is not None and (isinstance(num_processes, bool) or int(num_processes) < 1):
        raise InputError(f"initialize: num_processes must be >= 1, got {num_processes!r}")
    if num_processes == 1:
        return False
    if coordinator_address is None and num_processes is None and not _cluster_environment():
        return False  # one host: a no-op even after JAX has run (jax.distributed.initialize would raise then)
    on_cpu = env.get("JAX_PLATFORMS", "cpu").startswith("cpu")
    previous = jax.config.jax_cpu_collectives_implementation
    if on_cpu:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    except ValueError as e:  # no coordinator given and no cluster environment detected (JAX's message)
        if coordinator_address is not None or "coordinator_address" not in str(e):
            raise
        if on_cpu:
            jax.config.update("jax_cpu_collectives_implementation", previous)
        if num_processes is not None:
            raise InputError(f"initialize: {num_processes} processes need a coordinator: pass coordinator_address="
                             "'host:port' (or set INTERP_COORDINATOR) and each process's process_id") from None
        return False
    return True


def _cluster_environment() -> bool:
    """Whether `jax.distributed.initialize()` would find a cluster (TPU pod, SLURM, Open MPI, ...) to join: the
    environments JAX detects without being asked (its `ClusterEnv` registry). True when JAX's registry cannot be
    read, so that JAX decides."""
    try:
        from jax._src.clusters import ClusterEnv

        return any(not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types)
    except Exception:  # a JAX without this private registry: let jax.distributed.initialize decide
        return True


def sweep_mesh(devices=None, model: int = 1, *, cfg=None, rules=None, indivisible: str = "warn") -> Mesh:
    """A `("data", "model")` mesh over `devices` (default: every global device), `model` devices per
    tensor-parallel group; with the default rules sweeps split their items over `"data"`. With `cfg` (a
    `models.Config` or a `Model`), the model's parameters are checked against the mesh at once: an axis a rule
    splits over `"model"` whose size `model` does not divide (9 heads over 8) is replicated instead, and
    `indivisible` ("warn", "error" or "ignore") says what to do about it (`shard_params` does the same check)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    if isinstance(model, bool) or not isinstance(model, (int, np.integer)) or model < 1:
        raise InputError(f"sweep_mesh: model must be an int >= 1 (devices per tensor-parallel group), got {model!r}")
    if devices.size % model:
        raise InputError(f"sweep_mesh: {devices.size} devices cannot be split into tensor-parallel groups of "
                         f"model={model}; use a divisor of {devices.size}")
    mesh = Mesh(devices.reshape(-1, model), ("data", "model"))
    if cfg is not None:
        check_model_fits(cfg, mesh, rules, indivisible, "sweep_mesh")
    return mesh


def check_model_fits(cfg, mesh: Mesh, rules=None, indivisible: str = "warn", where: str = "mesh") -> list[str]:
    """`check_divisible` for every parameter of `cfg` (a `models.Config` or a `Model`), from its shapes alone."""
    cfg = getattr(cfg, "cfg", cfg)
    sizes = axis_sizes(cfg)
    flat = jax.tree_util.tree_flatten_with_path(param_axes(cfg), is_leaf=_is_axes)[0]
    return check_divisible(((_dotted(p), ax, tuple(sizes[a] for a in ax)) for p, ax in flat), mesh, rules,
                           indivisible, where, stacklevel=4)


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def indivisible_axes(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=None) -> list[tuple]:
    """`(logical axis, size, mesh axes, mesh size)` of each dimension that a rule would split over mesh axes
    present in `mesh` (of total size > 1) but that stays unsplit, because that size does not divide it."""
    axes = tuple(a or None for a in axes)
    table = active_rules(rules)
    spec = tuple(partition_spec(axes, shape, mesh, rules))
    spec = spec + (None,) * (len(axes) - len(spec))
    out = []
    for i, name in enumerate(axes):
        if name is None or spec[i] is not None:
            continue
        for rule_name, target in table:
            if rule_name != name or target is None:
                continue
            present = tuple(a for a in ((target,) if isinstance(target, str) else target) if a in mesh.shape)
            size = math.prod(mesh.shape[a] for a in present)
            if present and size > 1 and shape[i] % size:
                out.append((name, int(shape[i]), present, size))
                break
    return out


def check_divisible(entries: Iterable[tuple[str, Sequence[str], Sequence[int]]], mesh: Mesh, rules=None,
                    indivisible: str = "warn", where: str = "shard_params", stacklevel: int = 3) -> list[str]:
    """Find the dimensions of `(name, logical axes, shape)` entries left replicated on `mesh` because a mesh
    axis does not divide them (`indivisible_axes`); `indivisible="warn"` warns once (IndivisibleWarning) naming
    each logical axis, its size, the mesh axes and their size, and the parameters; "error" raises InputError;
    "ignore" does neither (the warning points `stacklevel` frames up: the caller of `where`). Returns the messages."""
    if indivisible not in INDIVISIBLE:
        raise InputError(f"{where}: indivisible must be one of {INDIVISIBLE}, got {indivisible!r}")
    found: dict[tuple, list[str]] = {}
    for name, axes, shape in entries:
        for key in indivisible_axes(axes, shape, mesh, rules):
            found.setdefault(key, []).append(name)
    msgs = []
    for (axis, size, mesh_axes, mesh_size), names in found.items():
        divisors = [d for d in range(1, size + 1) if size % d == 0 and d <= mesh.devices.size]
        axes_txt = "'" + "' x '".join(mesh_axes) + "'"
        msgs.append(f"{axis} ({size}) is not divisible by mesh axis {axes_txt} ({mesh_size}): {len(names)} "
                    f"parameter(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) are replicated over "
                    f"it instead of split (sizes that divide {size}: {divisors})")
    if msgs and indivisible != "ignore":
        text = f"{where}: " + "; ".join(msgs) + " (indivisible='ignore' silences this, 'error' makes it an error)"
        if indivisible == "error":
            raise InputError(text)
        warnings.warn(text, IndivisibleWarning, stacklevel=stacklevel)
    return msgs


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


def shard_params(params: Any, mesh: Mesh, rules=None, *, indivisible: str = "warn") -> Any:
    """Every parameter placed on `mesh` by its logical axes (`models.params.PARAMS`); multi-process safe. A
    dimension whose rule's mesh axes do not divide it is replicated; `indivisible` ("warn", "error", "ignore")
    says whether that warns (the default), raises InputError or passes (`check_divisible`)."""
    axes = logical_axes(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    check_divisible(((_dotted(p), ax, np.shape(a)) for (p, a), ax in
                     zip(flat, jax.tree.leaves(axes, is_leaf=_is_axes))), mesh, rules, indivisible)
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
