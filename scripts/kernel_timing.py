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


def time_per_call(fn, x, weights, *, reps: int = 10, warmup: int = 2,
                  target_s: float = 0.005, max_calls: int = 256) -> float:
    """Seconds of one `fn(x, w)` on the device, rotating over the list `weights`.

    One jitted program runs L calls (unrolled, call i reading weight copy i % R and its own
    activation buffer, both through an optimization barrier, so XLA can merge none of them:
    on a GPU it otherwise fuses dense dots that share a weight into one GEMM, which once
    reported a bf16 GEMV faster than the memory allows), and every output is returned whole: XLA
    may shrink a dense dot whose output is sliced, and a reduction per call would add a kernel
    launch of the same order as a 4-bit GEMV. L is chosen so the program holds about
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


def copy_bandwidth(nbytes: int = 2**30, reps: int = 10) -> float:
    """Device copy bandwidth in bytes/s (read + write), timed like the kernels over four
    buffers of `nbytes` / 4 each."""
    copies = [jnp.full((nbytes // 16,), float(i), jnp.float32) for i in range(4)]
    t = time_per_call(lambda x, a: a * 1.0 + 1.0, jnp.zeros((), jnp.float32), copies,
                      reps=reps)
    return 2 * (nbytes // 4) / t
