"""JAX's multi-controller runtime for any4 (docs/distributed.md): one process per host (or
per GPU), all running the same program, joined by `jax.distributed`.

`initialize` starts it from explicit arguments, the standard environment variables, or a
cluster JAX detects itself (SLURM, Cloud TPU, Open MPI); `process_mesh` is the global mesh,
one row of devices per process; `row_split` says which rows of an [N, K] matrix this process
owns, and `global_rows` assembles each process's rows into one global array (what orbax's
multi-process save writes collectively). `share`, `gather_items` and `allgather_rows` serve
data-parallel calibration and quantizing a model object in every process (`ptq`).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"${name}={v!r} is not an integer") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> dict:
    """Joins (or confirms) the multi-process runtime; returns {process, processes, devices,
    local_devices}. Arguments left None come from $JAX_COORDINATOR_ADDRESS /
    $JAX_NUM_PROCESSES / $JAX_PROCESS_ID, else from the cluster JAX detects. On CPUs the
    collectives are gloo's. Call before any other JAX work; calling again is a no-op."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV[1])
    process_id = process_id if process_id is not None else _env_int(ENV[2])
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("a manual launch needs all three of the coordinator address "
                         "(host:port), the number of processes and this process's id "
                         "(--coordinator/--num-processes/--process-id or $" + ", $".join(ENV)
                         + "); give all or none (none: the cluster's own, e.g. SLURM)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside 0..{num_processes - 1}")
    if not is_initialized():
        # CPU devices talk through gloo (set before the CPU backend starts; GPUs and TPUs
        # keep their own collectives)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kw = dict(initialization_timeout=timeout_s)
        if coordinator is not None:
            kw.update(coordinator_address=coordinator, num_processes=num_processes,
                      process_id=process_id)
        jax.distributed.initialize(**kw)
    return describe()


def is_initialized() -> bool:
    return jax.distributed.is_initialized()


def describe() -> dict:
    return {"process": jax.process_index(), "processes": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count()}


def is_primary() -> bool:
    """The process that writes what is written once (metadata, renames)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all arrive (a no-op in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _from_primary(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def broadcast_flag(flag: bool) -> bool:
    """The first process's `flag`, in every process (a collective: all must call it)."""
    return bool(_from_primary(int(flag)))


def primary_pid() -> int:
    """The first process's OS process id, in every process (names shared temporary files)."""
    return _from_primary(os.getpid())


def process_mesh() -> Mesh:
    """All devices of all processes as [processes, local devices], axes ("proc", "dev"),
    each process's devices in one row."""
    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devs).reshape(jax.process_count(), -1), ("proc", "dev"))


@dataclasses.dataclass(frozen=True)
class RowSplit:
    """This process's rows [start, stop) of an N-row matrix and the global sharding of the
    result: rows over every device when N divides evenly, over processes (replicated on a
    process's devices) when only that does, else every process holds all rows."""

    start: int
    stop: int
    spec: PartitionSpec


def row_split(n: int) -> RowSplit:
    p, d = jax.process_count(), jax.local_device_count()
    i = jax.process_index()
    if n % (p * d) == 0:
        spec = PartitionSpec(("proc", "dev"))
    elif n % p == 0:
        spec = PartitionSpec("proc")
    else:
        return RowSplit(0, n, PartitionSpec())
    per = n // p
    return RowSplit(i * per, (i + 1) * per, spec)


def global_rows(local, split: RowSplit, n: int, mesh: Mesh) -> jax.Array:
    """This process's rows `local` [stop - start, ...] as its part of a global [n, ...]
    array sharded as `split.spec` says."""
    spec = PartitionSpec(*split.spec, *([None] * (np.ndim(local) - 1)))
    sharding = NamedSharding(mesh, spec)
    shape = (n, *np.shape(local)[1:])
    if split.spec == PartitionSpec():
        return jax.device_put(np.asarray(local), sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local), shape)


def replicated(a, mesh: Mesh) -> jax.Array:
    """An array every process holds whole (the same value on all) as a global array."""
    return jax.device_put(np.asarray(a), NamedSharding(mesh, PartitionSpec()))


def share(n: int) -> range:
    """This process's contiguous share of `n` items (calibration batches): shares differ by at
    most one, in process order. Every item in one process, or when there are fewer items than
    processes (each process then does all of them)."""
    return share_of(n, jax.process_index())


def gather_items(items: list, n: int) -> list:
    """Every process's `items` (pytrees of arrays of one structure, the results of its
    `share(n)`), all `n` of them in item order, in every process (a collective)."""
    if len(items) == n:  # one process, or each process did every item
        return [jax.tree.map(np.asarray, t) for t in items]
    from jax.experimental import multihost_utils

    width = -(-n // jax.process_count())
    padded = list(items) + [items[0]] * (width - len(items))  # equal shapes for the gather
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *padded)
    got = multihost_utils.process_allgather(stacked)  # leaves [processes, width, ...]
    sizes = [len(share_of(n, q)) for q in range(jax.process_count())]
    return [jax.tree.map(lambda a, q=q, j=j: np.asarray(a[q, j]), got)
            for q, k in enumerate(sizes) for j in range(k)]


def share_of(n: int, process: int, processes: int | None = None) -> range:
    """`share(n)` as process `process` of `processes` (default: this job's) sees it."""
    p = jax.process_count() if processes is None else processes
    if p == 1 or n < p:
        return range(n)
    per, extra = divmod(n, p)
    start = process * per + min(process, extra)
    return range(start, start + per + (process < extra))


def sum_over_processes(tree):
    """The sum over processes of a pytree of arrays (every process's own partial sums), added
    in process order, the same in every process (a collective)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(jax.tree.map(np.asarray, tree))

    def fold(a):
        acc = a[0]
        for x in a[1:]:
            acc = acc + x
        return acc

    return jax.tree.map(fold, got)


def allgather_rows(a) -> np.ndarray:
    """Every process's rows `a` [n_i, ...] (equal n_i) concatenated in process order, in
    every process (a collective)."""
    if jax.process_count() == 1:
        return np.asarray(a)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(a), tiled=True))
