"""Block sizes of the Pallas kernel, per shape, from `tuning.json` (written by
`scripts/tune_pallas.py` on a GPU), with a rule-based fallback for shapes not in the table;
the CUDA library's default kernel; the row counts above which each kernel declines."""

from __future__ import annotations

import functools
import json
import os

_TABLE = os.path.join(os.path.dirname(__file__), "tuning.json")


@functools.cache
def _table() -> dict:
    if not os.path.isfile(_TABLE):
        return {}
    with open(_TABLE) as fh:
        return json.load(fh).get("entries", {})


def m_bucket(m: int) -> int:
    """M rounded up to the tuned buckets 16, 32, 64, 128, 256."""
    for b in (16, 32, 64, 128, 256):
        if m <= b:
            return b
    return 256


# what a tuning entry may set; the tuner also records its timings ("us", ...) beside them
CONFIG_KEYS = ("bm", "bn", "bk", "num_warps", "num_stages", "lookup", "post_scale", "split_k")


# programs the rule of thumb aims for: ~4 per SM of an H100 (132 SMs), so that the last wave
# of programs is a small part of the run
MIN_PROGRAMS = 512


def default_config(*, m: int, n: int, k: int, g: int) -> dict:
    """Rule of thumb until a GPU measures better: small M -> tall thin tiles over N; the
    gather lookup with post-scaling, the cheapest variant by instruction count that needs no
    extra bytes (9.3 per weight against the select tree's 19.2, pallas_gpu.py; the select tree
    is the only variant timed so far: 100 us on gate/up at M=1, 2.5x the dense product)."""
    bm = min(m_bucket(m), 64)
    bn = next(b for b in (128, 64, 32, 16) if n % b == 0)
    if m <= 16 and n >= 4096 and n % 64 == 0:
        bn = 64  # more programs for the memory-bound decode case
    bk = min(g, 256 if m <= 16 else 128)
    # split K (decode sizes) until the grid has enough programs to fill the GPU: a GEMV over
    # N/BN tiles alone leaves most SMs idle (Llama-3-8B q/k/v: 96 tiles of 64 rows for 132
    # SMs). Each split writes float32 partials [Mp, N] that XLA then sums: kept under a
    # quarter of the codes' bytes (8 * split * Mp * N <= N * K / 8).
    mp = -(-m // bm) * bm
    split_k, tiles = 1, (n // bn) * (mp // bm)
    cap = k // (64 * mp) if m <= 16 else 1
    while (tiles * split_k < MIN_PROGRAMS and 2 * split_k <= cap
           and k % (2 * split_k * g) == 0):
        split_k *= 2
    return {"bm": bm, "bn": bn, "bk": bk, "num_warps": 4, "num_stages": 3, "lookup": "gather",
            "post_scale": True, "split_k": split_k}


def block_config(*, m: int, n: int, k: int, g: int) -> dict:
    key = f"{n}x{k}:g{g}:m{m_bucket(m)}"
    cfg = dict(default_config(m=m, n=n, k=k, g=g))
    cfg.update({c: v for c, v in _table().get(key, {}).items() if c in CONFIG_KEYS})
    if n % cfg["bn"] or g % cfg["bk"] or k % (cfg["split_k"] * g):
        # a table entry for another group size: ignore
        cfg = default_config(m=m, n=n, k=k, g=g)
    return cfg


# Above this many rows of x the kernel declines and `lut_matmul` falls back to the reference
# (dequantize once, then a dense MMA GEMM). A rule until a GPU measures the crossover per shape
# (`scripts/tune_pallas.py` writes "dense_threshold" entries).
DEFAULT_DENSE_THRESHOLD = 128


def dense_threshold(*, n: int, k: int) -> int:
    return int(_table().get(f"{n}x{k}:dense_threshold", DEFAULT_DENSE_THRESHOLD))


# The CUDA library's kernel (cuda_ffi.KERNELS) that calls run unless $ANY4_JAX_CUDA_KERNEL or
# the call says otherwise. "scaled" is the only one timed on a GPU so far (24-34% of copy
# bandwidth on the Llama-3-8B shapes at M = 1, 0.9-1.3x the dense product:
# docs/cuda_kernel_notes.md); the unit post-scale kernels issue 2.9 ("unit_pair") and 5.0
# ("unit_lane") instructions per code against its 9.7 (counted from SASS), and by the shared
# memory pipe (pair-table reads collide in banks ~3.5-way) the lane table is the one whose
# floor on gate_up (~9 us issue) sits under the bytes' (~10.5 us): the rule picks it until a
# GPU measures (`scripts/bench_kernels.py` times all three at the JAX level). If the GPU tests
# find it failing, "scaled" is the measured fallback.
DEFAULT_CUDA_KERNEL = "unit_lane"

# The CUDA kernel is correct for any M (it re-reads the weight once per 16 rows of x), but
# `implementation=None` sends more rows than this to the next implementation. A rule (the
# kernel's target is M <= 16) until a GPU measures the crossover ("cuda_dense_threshold").
DEFAULT_CUDA_DENSE_THRESHOLD = 64


def cuda_dense_threshold(*, n: int, k: int) -> int:
    return int(_table().get(f"{n}x{k}:cuda_dense_threshold", DEFAULT_CUDA_DENSE_THRESHOLD))
