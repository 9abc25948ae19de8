"""Sorting every row of a matrix, carrying a second array along (the k-means input).

XLA's CPU sort calls a comparator per element pair and is about 8x slower than numpy's
vectorised sort; on CPU we therefore sort on the host: the float bits are mapped to an
order-preserving uint32, the column index is appended below them, and one uint64 sort per
row yields both the sorted values and the permutation (ties in index order, so stable).
On GPU and TPU the sort stays on the device (`lax.sort`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from any4_jax.quant.kmeans import sort_rows

_sort_on_device = jax.jit(sort_rows)


def _order_keys(x: np.ndarray) -> np.ndarray:
    """float32 [R, K] -> uint64 [R, K]: (order-preserving bits << 32) | column index."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    neg = (bits >> 31).astype(bool)
    ordered = np.where(neg, ~bits, bits | np.uint32(0x80000000))
    cols = np.arange(x.shape[1], dtype=np.uint64)
    return (ordered.astype(np.uint64) << np.uint64(32)) | cols


def _sort_block(x: np.ndarray, w: np.ndarray):
    keys = np.sort(_order_keys(x), axis=1)
    perm = (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)
    return np.take_along_axis(x, perm, 1), np.take_along_axis(w, perm, 1)


def sort_rows_host(x: np.ndarray, w: np.ndarray, workers: int | None = None):
    """Row-wise sort of x with w carried along, on the host, split over threads (numpy
    releases the GIL while sorting)."""
    workers = workers or os.cpu_count() or 1
    r = x.shape[0]
    if workers == 1 or r < 2 * workers:
        return _sort_block(x, w)
    bounds = np.linspace(0, r, workers + 1).astype(int)
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(lambda i: _sort_block(x[bounds[i]:bounds[i + 1]],
                                                    w[bounds[i]:bounds[i + 1]]),
                              range(workers)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def sort_rows_auto(x: jax.Array, w: jax.Array):
    """Sorted (x, w) rows: on the host for CPU arrays, on the device otherwise."""
    platform = next(iter(x.devices())).platform if hasattr(x, "devices") else "cpu"
    if platform == "cpu":
        return sort_rows_host(np.asarray(x), np.asarray(w))
    return _sort_on_device(x, w)
