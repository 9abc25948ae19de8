"""Device timing for the benchmarks and the Pallas tuner (`scripts/kernel_bench.py`,
`scripts/bench_decode.py`).

A measurement runs one jitted program of many unrolled calls over R distinct weight copies,
with R chosen so that the copies exceed the L2 cache several times over: the time per call is
then the weight's trip from memory, not from cache. `time_once` is the host-clock stand-in for
tests of the scripts on any backend; `cuda_profiler_range` brackets the calls Nsight Compute
should profile; `descend` is the tuner's search over a configuration. Imports only jax, numpy
and the standard library.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

L2_BYTES = 50 * 2**20  # H100: 50 MB


def copies_for(nbytes: int, min_total: int = 4 * L2_BYTES, max_copies: int = 64) -> int:
    """How many copies of an `nbytes` weight exceed `min_total` bytes (2 to `max_copies`)."""
    return max(2, min(max_copies, -(-min_total // max(nbytes, 1))))


def time_per_call(fn: Callable, x: jax.Array, weights: Sequence, *, reps: int = 10,
                  warmup: int = 2, target_s: float = 0.005, max_calls: int = 256) -> float:
    """Seconds of one `fn(x, w)` on the device, rotating over the list `weights`.

    x: the activations, e.g. [M, K]; weights: R copies of one weight (any pytree `fn` takes).

    One jitted program runs L calls (unrolled, call i reading weight copy i % R and its own
    activation buffer, both through an optimization barrier, so XLA can merge none of them:
    on a GPU it otherwise fuses dense dots that share a weight into one GEMM, which once
    reported a bf16 GEMV faster than the memory allows), and every output is returned whole:
    XLA may shrink a dense dot whose output is sliced, and a reduction per call would add a
    kernel launch of the same order as a 4-bit GEMV. L is chosen so the program holds about
    `target_s` of device work (a first program of max(R, 8) calls estimates one call): the
    fixed cost of dispatching a program (~0.1 ms) is then a few percent of the time, not the
    bulk of it as with two copies of a large dense matrix. Median over `reps`, divided by L.
    """
    r = len(weights)

    def measure(calls):
        @jax.jit
        def many(xs, ws):
            outs = []
            for i in range(calls):
                # the barrier makes each call's operands distinct values: without it XLA's GPU
                # pipeline merges the dense dots that share a weight copy into one GEMM (and
                # CSEs identical calls), which reads the weight once for many calls
                xb, wb = jax.lax.optimization_barrier((xs[i], ws[i % r]))
                outs.append(fn(xb, wb))
            return tuple(outs)

        xs = [x + 0 for _ in range(calls)]  # distinct buffers, same values
        for _ in range(warmup):
            jax.block_until_ready(many(xs, weights))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(many(xs, weights))
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) / calls

    calls = max(r, 8)
    t = measure(calls)
    longer = min(max_calls, max(calls, int(target_s / max(t, 1e-9)) + 1))
    return measure(longer) if longer > calls else t


def time_once(fn: Callable, x: jax.Array, weights: Sequence) -> float:
    """Seconds of one `fn(x, weights[0])` by the host clock, compilation included: a figure
    that means nothing, for running a timing script end to end on any backend."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x, weights[0]))
    return time.perf_counter() - t0


def copy_bandwidth(nbytes: int = 2**30, reps: int = 10) -> float:
    """Device copy bandwidth in bytes/s (read + write), timed like the kernels over four
    buffers of `nbytes` / 4 each."""
    copies = [jnp.full((nbytes // 16,), float(i), jnp.float32) for i in range(4)]
    t = time_per_call(lambda x, a: a * 1.0 + 1.0, jnp.zeros((), jnp.float32), copies,
                      reps=reps)
    return 2 * (nbytes // 4) / t


def read_bandwidth(nbytes: int = 2**28, reps: int = 5) -> float:
    """Read bandwidth in bytes/s: a jitted row sum (rows of 4096 float32, so XLA can split the
    rows over its threads) over four buffers of `nbytes` / 4 each, in turn, the best of `reps`
    rounds. The ceiling of a decode step on the CPU, which reads its weights and writes almost
    nothing: XLA:CPU's copy (`copy_bandwidth`) runs at a fraction of the memory's speed there
    (6-8 GB/s on the 2-core development VM against 22-29 GB/s for this). Give `nbytes` well
    above the last-level cache of the machine (the default, 256 MiB, is 8x this VM's L3)."""
    bufs = [jnp.full((nbytes // 16 // 4096, 4096), float(i), jnp.float32) for i in range(4)]
    row_sums = jax.jit(lambda a: jnp.sum(a, axis=1))
    for b in bufs:
        row_sums(b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for b in bufs:
            row_sums(b).block_until_ready()
        best = min(best, (time.perf_counter() - t0) / len(bufs))
    return bufs[0].nbytes / best


def _cudart() -> ctypes.CDLL:
    """The CUDA runtime library: the system's, or the one a `nvidia-cuda-runtime` wheel put
    into site-packages (found by path, without importing it)."""
    names = [ctypes.util.find_library("cudart")]
    names += sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so*"))
    for d in sys.path:
        names += sorted(glob.glob(os.path.join(d, "nvidia", "cuda_runtime", "lib",
                                               "libcudart.so*")))
    for name in names:
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    raise RuntimeError("libcudart not found (neither the system's nor an nvidia-cuda-runtime "
                       "wheel's): cannot bracket the profiled region; install the CUDA runtime")


@contextlib.contextmanager
def cuda_profiler_range():
    """Only what runs inside is profiled by `ncu --profile-from-start off` (or nsys with
    `--capture-range=cudaProfilerApi`): cudaProfilerStart/Stop, with the device synchronized
    on both sides."""
    rt = _cudart()
    rt.cudaDeviceSynchronize()
    rt.cudaProfilerStart()
    try:
        yield
    finally:
        rt.cudaDeviceSynchronize()
        rt.cudaProfilerStop()


def descend(start, axes: Sequence[dict[str, dict]], timed: Callable, valid: Callable,
            over: Callable[[], bool]):
    """Coordinate descent over a configuration: axis by axis, every value of the axis that
    `valid` accepts, applied to the best configuration so far; each configuration timed once.

    start: a frozen configuration with `.replace(**changes)` (e.g. `PallasConfig`);
    axes: the axes in order, each {label: changes}; timed(cfg) -> seconds, or None where it
    failed; valid(cfg) -> bool; over() -> True once the time budget is spent: from then on
    only the first axis is searched. Returns (the best configuration, its seconds or None,
    {label: seconds or None} of the first axis's values, whose changes are meant to set the
    same fields: each is then timed with `start`'s other settings).
    """
    best_cfg, best_t = start, timed(start)
    tried = {start: best_t}
    first = {}
    for i, axis in enumerate(axes):
        for label, changes in axis.items():
            if i and over():
                break
            cfg = best_cfg.replace(**changes)
            if not valid(cfg):
                continue
            if cfg not in tried:
                tried[cfg] = timed(cfg)
            t = tried[cfg]
            if i == 0:
                first[label] = t
            if t is not None and (best_t is None or t < best_t):
                best_t, best_cfg = t, cfg
    return best_cfg, best_t, first
