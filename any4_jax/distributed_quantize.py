"""Quantize a Hugging Face checkpoint across processes (docs/distributed.md).

Every process runs `quantize_hf_files` with the same arguments. Each reads, from the memory-
mapped safetensors files, only the rows it owns of every matrix it quantizes (`distributed.
row_split`: an even share per process), quantizes them on its own devices with the very code
of one process (rows never interact, so every row's codes, table, scales and zeros are the
single-process ones bit for bit), and contributes them to global arrays that orbax writes
collectively. No process ever holds a whole quantized layer set or the dense weights of the
quantized layers; the unquantized tensors (embedding, norms, lm_head) are read whole by each.

Calibration statistics come from a file (`any4 calibrate`, itself data parallel with
`--distributed`) or are not used (int/nf4/fp4, or `sample_weighting="none"`): a forward pass
over calibration text needs the whole model, which this path never loads. `any4 quantize
--distributed` takes the model-object path (`ptq.quantize_model` in every process, rows and
calibration batches split over the processes) when a forward is wanted.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from any4_jax import distributed
from any4_jax.checkpoint import save_quantized
from any4_jax.models.llama.convert_hf import (
    _infos,
    _torch_to_flax,
    checkpoint_dtype,
    hf_name_to_path,
    ignored,
    read_hf_config,
    weight_files,
)
from any4_jax.models.llama.params import abstract_model, assemble, check_tensors
from any4_jax.models.llama.safetensors_io import CheckpointError, SafetensorsFile
from any4_jax.models.llama.tokenizer import hf_tokenizer
from any4_jax.nn.layers import set_layer
from any4_jax.nn.qdense import QuantDense
from any4_jax.ptq.quantize_model import (
    DEFAULT_EXCLUDE,
    _check_group_sizes,
    layer_configs,
    select_layers,
)
from any4_jax.quant.config import QuantConfig
from any4_jax.quant.quantize import quantize_weight, row_mesh
from any4_jax.quant.qweight import QuantizedWeight


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path[:-1])


def quantize_hf_files(path, config: QuantConfig, out, *, stats: Mapping | None = None,
                      include: Sequence[str] = ("*",),
                      exclude: Sequence[str] = DEFAULT_EXCLUDE,
                      overrides: Mapping | None = None, param_dtype=None,
                      metadata: dict | None = None, overwrite: bool = False,
                      progress: bool = True) -> dict:
    """Quantizes the Hugging Face directory `path` into the any4 checkpoint `out`, in every
    process of the running `jax.distributed` job (one process works too). Returns a report:
    {"layers", "rows_per_process", "seconds", "out"}. Every check (files, formats, group sizes,
    statistics, the output directory) runs before any tensor is read."""
    t0 = time.perf_counter()
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a Hugging Face directory (config.json and "
                              "safetensors): the multi-process path reads those files")
    cfg = read_hf_config(path)
    if cfg.is_moe:
        raise ValueError(f"{path}: multi-process quantization takes dense Llama-family models; "
                         "this one has stacked experts (quantize it in one process)")
    dt = jnp.dtype(param_dtype or checkpoint_dtype(path))
    files = weight_files(path)
    shards = [SafetensorsFile(f) for f in files]
    model = abstract_model(cfg, dt)
    check_tensors(cfg, _infos(shards, cfg), source=path, model=model)
    paths = select_layers(model, include, exclude)
    if not paths:
        raise ValueError(f"no Dense layer matches include={list(include)} "
                         f"exclude={list(exclude)}")
    cfgs = layer_configs(paths, config, overrides)
    if any(c.spec.family == "bcq" for c in cfgs.values()):
        raise ValueError("format 'bcq' is not supported across processes yet; quantize it in "
                         "one process")
    _check_group_sizes(model, cfgs)
    missing = [p for p in paths if cfgs[p].uses_activation_stats and (stats is None or
                                                                      p not in stats)]
    if missing:
        raise ValueError(f"{len(missing)} layers need activation statistics (e.g. "
                         f"{missing[:3]}): pass a file from `any4 calibrate` (--stats), or use "
                         "sample_weighting='none' / a format without them")
    tok = hf_tokenizer(path)
    mesh = distributed.process_mesh()
    local = row_mesh(jax.local_devices()) if jax.local_device_count() > 1 else None
    selected = set(paths)
    dense: list = []
    rows_here = 0
    bar = tqdm(total=len(paths), desc=f"quantizing (process {jax.process_index()})",
               unit="layer", disable=not progress)
    for st in shards:
        for name in st:
            if ignored(name, cfg):
                continue
            p = hf_name_to_path(name)
            dotted = _dotted(p)
            if dotted not in selected:
                dense.append((p, st.get(name)))  # a view of the memory map: read when used
                continue
            w = st.get(name)  # torch layout [N, K]: rows are contiguous in the file
            split = distributed.row_split(w.shape[0])
            rows = jnp.asarray(np.asarray(w[split.start:split.stop]), dtype=dt)
            rows_here += split.stop - split.start
            xbar = stats.get(dotted) if cfgs[dotted].uses_activation_stats else None
            qw = quantize_weight(rows, cfgs[dotted], sample_weight=xbar, mesh=local,
                                 name=dotted)
            n = w.shape[0]
            leaves = {f: distributed.global_rows(np.asarray(getattr(qw, f)), split, n, mesh)
                      for f in QuantizedWeight._DATA}
            glob = QuantizedWeight.from_meta(dataclasses.replace(qw.meta, shape=(n, w.shape[1])),
                                             **leaves)
            set_layer(model, dotted, QuantDense(glob))
            bar.update(1)
    bar.close()
    model = assemble(cfg, dense, param_dtype=dt, source=path, convert=_torch_to_flax,
                     model=model)
    for st in shards:
        st.close()
    report = {"layers": len(paths), "processes": jax.process_count(),
              "rows_this_process": rows_here, "seconds": time.perf_counter() - t0}
    final = save_quantized(out, model, tokenizer=tok, overwrite=overwrite,
                           metadata={**(metadata or {}), "distributed": report})
    report["out"] = str(final)
    return report

