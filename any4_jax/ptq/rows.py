"""One matrix quantized with its rows split over the processes of a `jax.distributed` job
(docs/distributed.md): `quantize_model` and `quantize_params` call `quantize_rows` in every
process and get, in every process, the very `QuantizedWeight` one process would make.

Each process quantizes its contiguous share of the rows (`distributed.row_split`) on its own
devices, and the shares are all-gathered. Rows never interact in round-to-nearest any-n, int,
nf4 or fp4 (k-means, scales and zeros are per row), so every row's result is the one-process
result bit for bit, and the gathered matrix is too. Where rows do interact, or a process
could not pick its rows' statistics alone, every process quantizes the whole matrix (the
same result, no speed-up): LO-BCQ (local codebooks are learned over the blocks of every row),
stacked experts whose number the processes do not divide (each process must hold whole
experts, whose rows share one statistic), and a row count the processes do not divide.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import PartitionSpec

from any4_jax import distributed
from any4_jax.quant.config import QuantConfig
from any4_jax.quant.quantize import quantize_weight, row_mesh
from any4_jax.quant.qweight import QuantizedWeight


def splits_rows(w_shape: tuple, config: QuantConfig, sample_weight) -> bool:
    """Whether `quantize_rows` splits this matrix's rows over the processes."""
    if jax.process_count() == 1 or config.spec.family == "bcq":
        return False
    # one statistic per block of rows (stacked experts): whole blocks per process only
    if (sample_weight is not None and np.ndim(sample_weight) != 1
            and np.shape(sample_weight)[0] % jax.process_count()):
        return False
    return distributed.row_split(w_shape[0]).spec != PartitionSpec()


def quantize_rows(w, config: QuantConfig, *, sample_weight=None, name: str = "weight",
                  return_info: bool = False, codebooks=None):
    """`quantize_weight(w [N, K], ...)`, its rows shared out over the processes (see the
    module docstring); in one process exactly `quantize_weight`. Every process must call it
    with the same arguments (it is a collective when it splits)."""
    if not splits_rows(np.shape(w), config, sample_weight):
        return quantize_weight(w, config, sample_weight=sample_weight, name=name,
                               return_info=return_info, codebooks=codebooks)
    n, k = np.shape(w)
    split = distributed.row_split(n)
    local = row_mesh(jax.local_devices()) if jax.local_device_count() > 1 else None
    xbar = sample_weight
    if xbar is not None and np.ndim(xbar) == 2:  # this process's blocks' statistics
        per = n // np.shape(xbar)[0]
        xbar = xbar[split.start // per:split.stop // per]
    qw, info = quantize_weight(w[split.start:split.stop], config, sample_weight=xbar,
                               mesh=local, name=name, return_info=True, codebooks=codebooks)
    leaves = {f: distributed.allgather_rows(getattr(qw, f)) for f in QuantizedWeight._DATA}
    full = QuantizedWeight.from_meta(dataclasses.replace(qw.meta, shape=(n, k)),
                                     **{f: jax.numpy.asarray(a) for f, a in leaves.items()})
    if not return_info:
        return full
    out = {"rows": n, "processes": jax.process_count(),
           "rows_per_process": split.stop - split.start}
    if "kmeans_iters_mean" in info:  # shares are equal: the mean of the means is the mean
        it = distributed.allgather_rows(np.asarray([[info["kmeans_iters_mean"],
                                                     info["kmeans_iters_max"]]], np.float64))
        out.update(kmeans_iters_mean=float(it[:, 0].mean()), kmeans_iters_max=int(it[:, 1].max()))
    return full, out
