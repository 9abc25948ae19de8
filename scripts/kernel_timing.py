"""Timing helpers shared by bench_kernels.py and tune_pallas.py (GPU scripts).

Each measurement runs one jitted function over R distinct weight copies (unrolled, so every
call reads its own buffers and no slicing copy is added), with R chosen so the copies exceed
the L2 cache several times over; the time per call is the median over repetitions / R.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

L2_BYTES = 50 * 2**20  # H100: 50 MB


def copies_for(nbytes: int, min_total: int = 4 * L2_BYTES, max_copies: int = 64) -> int:
    return max(2, min(max_copies, -(-min_total // max(nbytes, 1))))


def time_per_call(fn, x, weights, *, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of one `fn(x, w)`, rotating over the list `weights`."""

    @jax.jit
    def many(x, ws):
        # unrolled: each call reads its own copy. Every output is returned whole: XLA may
        # shrink a dense dot whose output is sliced, and a reduction per call would add a
        # kernel launch that is a sizeable part of a 4-bit GEMV's few microseconds.
        return tuple(fn(x, w) for w in ws)

    for _ in range(warmup):
        jax.block_until_ready(many(x, weights))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(many(x, weights))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / len(weights)


def copy_bandwidth(nbytes: int = 2**30, reps: int = 10) -> float:
    """Device copy bandwidth in bytes/s: read + write of a `nbytes` buffer."""
    a = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0 + 1.0)  # one read, one write, no fusion away
    f(a).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(ts)
