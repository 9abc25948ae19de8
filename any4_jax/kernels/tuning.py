"""The Pallas kernel's configuration (`PallasConfig`), per shape from `tuning.json` (written by
the tuner on a GPU, `scripts/kernel_bench.py tune`) with a rule-based fallback for shapes not
in the table; the CUDA library's default kernel; the row counts above which each declines."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

TABLE_PATH = os.path.join(os.path.dirname(__file__), "tuning.json")
LOOKUPS = ("select", "gather", "pair")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PallasConfig:
    """How the Pallas kernel tiles and computes (`pallas_gpu.py` explains the variants).

    bm, bn, bk: tile rows of x, rows of the weight, and the K block (bk divides the group size).
    num_warps, num_stages: Triton's launch parameters.
    lookup: "select" (a select tree in registers), "gather" (a load from the table's ref) or
      "pair" (one load per code byte from a pair table; post-scale inputs only).
    post_scale: feed the raw table values to the MMA and scale the partial sums.
    split_k: programs per output tile along K (each covers whole groups).
    """

    bm: int
    bn: int
    bk: int
    num_warps: int = 4
    num_stages: int = 3
    lookup: str = "gather"
    post_scale: bool = True
    split_k: int = 1

    def __post_init__(self):
        for f in ("bm", "bn", "bk", "num_warps", "num_stages", "split_k"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PallasConfig: {f}={v!r} must be a positive integer")
        if self.lookup not in LOOKUPS:
            raise ValueError(f"PallasConfig: lookup={self.lookup!r} is not one of {LOOKUPS}")
        if not isinstance(self.post_scale, bool):
            raise ValueError(f"PallasConfig: post_scale={self.post_scale!r} must be a bool")

    def replace(self, **changes) -> PallasConfig:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown Pallas settings {unknown}; PallasConfig has "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def problems(self, *, n: int, k: int, g: int) -> list[str]:
        """Why this configuration cannot run an [N, K] weight with groups of g (each problem
        named with its constraint); [] if it can."""
        out = []
        if n % self.bn:
            out.append(f"bn={self.bn} does not divide N={n}")
        if g % self.bk:
            out.append(f"bk={self.bk} does not divide the group size {g} (one scale per block)")
        if k % (self.split_k * g):
            out.append(f"split_k={self.split_k}: each split must cover whole groups, K={k} is "
                       f"not a multiple of split_k x group_size = {self.split_k * g}")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(PallasConfig))


@functools.cache
def _table() -> dict:
    if not os.path.isfile(TABLE_PATH):
        return {}
    with open(TABLE_PATH) as fh:
        return json.load(fh).get("entries", {})


def m_bucket(m: int) -> int:
    """M rounded up to the tuned buckets 16, 32, 64, 128, 256."""
    for b in (16, 32, 64, 128, 256):
        if m <= b:
            return b
    return 256


# programs the rule of thumb aims for: ~4 per SM of an H100 (132 SMs), so that the last wave
# of programs is a small part of the run
MIN_PROGRAMS = 512


def default_config(*, m: int, n: int, k: int, g: int) -> PallasConfig:
    """The rule of thumb for shapes the table lacks: small M -> tall thin tiles over N; the
    gather lookup with post-scaling, the cheapest variant by instruction count that needs no
    extra bytes (9.3 per weight against the select tree's 19.2; docs/kernels.md)."""
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
    return PallasConfig(bm=bm, bn=bn, bk=bk, split_k=split_k)


def block_config(*, m: int, n: int, k: int, g: int) -> PallasConfig:
    """The tuning table's configuration for this shape (its rule-based default where the table
    has no entry, or one made for another group size)."""
    rule = default_config(m=m, n=n, k=k, g=g)
    entry = _table().get(f"{n}x{k}:g{g}:m{m_bucket(m)}", {})
    cfg = rule.replace(**{c: v for c, v in entry.items() if c in FIELDS})
    return rule if cfg.problems(n=n, k=k, g=g) else cfg


# Above this many rows of x the kernel declines and `lut_matmul` falls back to the reference
# (dequantize once, then a dense MMA GEMM); the tuner measures the crossover per shape and
# writes "dense_threshold" entries.
DEFAULT_DENSE_THRESHOLD = 128


def dense_threshold(*, n: int, k: int) -> int:
    return int(_table().get(f"{n}x{k}:dense_threshold", DEFAULT_DENSE_THRESHOLD))


# The CUDA library's kernel (cuda_ffi.KERNELS) that calls run unless $ANY4_JAX_CUDA_KERNEL or
# the call says otherwise. The unit post-scale kernels issue 2.9 ("unit_pair") and 5.0
# ("unit_lane") instructions per code against "scaled"'s 9.7 (counted from SASS), and by the
# shared-memory pipe (pair-table reads collide in banks ~3.5-way) the lane table is the one
# whose issue floor on gate_up (~9 us) sits under the bytes' (~10.5 us); "scaled" is the
# fallback. Measured times and what is verified where: docs/kernels.md.
DEFAULT_CUDA_KERNEL = "unit_lane"

# The CUDA kernel is correct for any M (it re-reads the weight once per 16 rows of x), but
# `implementation=None` sends more rows than this to the next implementation: the kernel's
# target is M <= 16; the tuner measures the crossover ("cuda_dense_threshold" entries).
DEFAULT_CUDA_DENSE_THRESHOLD = 64


def cuda_dense_threshold(*, n: int, k: int) -> int:
    return int(_table().get(f"{n}x{k}:cuda_dense_threshold", DEFAULT_CUDA_DENSE_THRESHOLD))
