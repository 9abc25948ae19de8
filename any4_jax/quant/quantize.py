"""`quantize_weight`: one `[N, K]` matrix -> `QuantizedWeight`, for every format.

Rows are processed in fixed-size chunks (bounded memory, one compilation per chunk shape),
and each chunk can be split over the devices of a 1-D mesh along the row axis. Results do
not depend on the chunk size or the number of devices.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from any4_jax.quant import kmeans_cpu, scaling
from any4_jax.quant.bcq import check_bcq_shape
from any4_jax.quant.bcq_quantize import quantize_bcq
from any4_jax.quant.config import KMeansConfig, QuantConfig
from any4_jax.quant.formats import FormatSpec, int_grid_table
from any4_jax.quant.kmeans import assign_sorted_codes, grid_init, kmeans_rows, pow2_normalize_rows
from any4_jax.quant.kmeans_cpu import kmeans_rows_cpu, optimal_rows_cpu
from any4_jax.quant.kmeans_optimal import optimal_kmeans_rows
from any4_jax.quant.qweight import QuantizedWeight, pack_codes
from any4_jax.quant.rowsort import sort_rows_auto

# Elements per chunk: the k-means working set is about 40 bytes per element (sorted copies,
# prefix sums, the k-means++ trial distances), so 2^22 elements stay near 200 MB on a CPU.
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "gpu": 1 << 25, "tpu": 1 << 24}
# XLA:CPU emits a different (differently rounded) row-reduction loop for fewer than 16 rows;
# padding every device's share of a chunk to at least 16 rows keeps a row's result independent
# of the chunk size and the device count.
_MIN_ROWS_PER_DEVICE = 16


def row_mesh(devices=None) -> Mesh:
    """A 1-D mesh named "rows" over `devices` (default: all local devices)."""
    devs = np.array(devices if devices is not None else jax.local_devices())
    return Mesh(devs, ("rows",))


def _is_int(v) -> bool:
    """An integer that is not a bool (True would silently mean 1)."""
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


_F32_MAX = float(np.finfo(np.float32).max)


def max_abs_limit(storage_dtype) -> float:
    """The largest |w| that quantizes without overflow: half the largest finite value of both
    float32 (in which the scales are computed) and the storage dtype. Half, because a group's
    range max - min, its 2^n - 1 steps and the dequantization's intermediates reach about twice
    max|w|."""
    return min(_F32_MAX, float(jnp.finfo(storage_dtype).max)) / 2


@jax.jit
def _weight_stats(w):
    """(non-finite count, flat index of the first, largest finite |w|) in one pass."""
    bad = ~jnp.isfinite(w)
    big = jnp.max(jnp.where(bad, 0, jnp.abs(w)))
    return jnp.sum(bad), jnp.argmax(bad.reshape(-1)), big


def _host_weight_stats(a: np.ndarray):
    """As `_weight_stats`, in numpy: for inputs wider than float32 (float64), whose values
    beyond float32's range would turn into inf on conversion and be reported as such."""
    bad = ~np.isfinite(a)
    return int(bad.sum()), int(np.argmax(bad.reshape(-1))), float(np.abs(np.where(bad, 0, a)).max())


def _check_structure(w, name: str) -> None:
    """The checks that need no pass over the values: a non-empty 2-D float array."""
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
        raise TypeError(f"{name}: expected an array of shape [out_features, in_features], "
                        f"got {type(w).__name__}")
    if len(w.shape) != 2:
        raise ValueError(
            f"{name}: expected a 2-D weight [out_features, in_features], got shape "
            f"{tuple(w.shape)}; reshape it (e.g. merge the head dims) before quantizing"
        )
    if 0 in tuple(w.shape):
        raise ValueError(
            f"{name}: the weight has shape {tuple(w.shape)}, which is empty (no "
            f"{'rows' if w.shape[0] == 0 else 'input features'}); there is nothing to quantize: "
            "leave the layer out, or check how it was loaded")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating-point weight, got dtype {w.dtype}")


def validate_weight(w, *, name: str = "weight", storage_dtype=None) -> jax.Array:
    """Checks a weight is a non-empty, finite 2-D float matrix whose largest |w| is within
    `max_abs_limit(storage_dtype)` (float32 alone when storage_dtype is None); returns it as a
    jax Array. The group size rule, which also wants K even, is
    `QuantConfig.resolve_group_size`'s."""
    _check_structure(w, name)
    if not isinstance(w, jax.Array) and np.dtype(w.dtype).itemsize > 4:
        count, first, big = _host_weight_stats(np.asarray(w))
    else:
        w = jnp.asarray(w)
        count, first, big = (x.item() for x in _weight_stats(w))
    if count:
        first = np.unravel_index(first, w.shape)
        raise ValueError(
            f"{name}: {count} non-finite value(s) (NaN/Inf) in the weight, the first at index "
            f"{tuple(int(i) for i in first)}; fix or drop them before quantizing"
        )
    dt = jnp.dtype(jnp.float32 if storage_dtype is None else storage_dtype)
    limit, dt_max = max_abs_limit(dt), float(jnp.finfo(dt).max)
    if big > limit:
        wider = (", or store the table and scales in a wider dtype "
                 "(QuantConfig(dtype='float32'))" if dt_max < _F32_MAX / 2 else "")
        raise ValueError(
            f"{name}: the largest |w| is {big:.6g}, above the limit {limit:.6g} for {dt.name} "
            f"(half its largest value, {dt_max:.6g}): the group ranges, "
            "scales and dequantized weights would overflow to inf; rescale the weight (divide "
            f"it by a power of two and fold the factor into the layer's output){wider}")
    return jnp.asarray(w)


def _validate_sample_weight(sample_weight, n: int, k: int, name: str) -> jax.Array:
    if sample_weight is None:
        return jnp.ones((k,), jnp.float32)
    try:
        sw = jnp.asarray(sample_weight, jnp.float32)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{name}: sample_weight must be an array of {k} non-negative numbers (one statistic "
            f"per input channel), got {type(sample_weight).__name__}") from e
    blocks_ok = sw.ndim == 2 and sw.shape[1] == k and sw.shape[0] >= 1 and n % sw.shape[0] == 0
    if sw.shape != (k,) and not blocks_ok:
        raise ValueError(
            f"{name}: sample_weight has shape {tuple(sw.shape)}, expected ({k},): one "
            f"statistic per input channel (or (m, {k}) with m dividing the {n} rows: one per "
            "block of n/m consecutive rows, e.g. per expert)"
        )
    if not bool(jnp.all(jnp.isfinite(sw))) or bool(jnp.any(sw < 0)):
        raise ValueError(f"{name}: sample_weight must be finite and >= 0 (got min "
                         f"{float(jnp.min(sw))}); pass |statistics|")
    return sw


def _check_arguments(config, mesh, chunk_elements, name) -> QuantConfig:
    """The type checks of `quantize_weight`'s arguments; returns the config to use."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a string (the layer's name, used in messages), got "
                        f"{type(name).__name__} {name!r}")
    if config is None:
        config = QuantConfig()
    elif isinstance(config, Mapping):
        raise TypeError(f"{name}: config must be a QuantConfig, got a {type(config).__name__}; "
                        "build one with QuantConfig(**config)")
    elif not isinstance(config, QuantConfig):
        hint = (" (KMeansConfig goes inside it: QuantConfig(kmeans=...))"
                if isinstance(config, KMeansConfig) else "")
        raise TypeError(f"{name}: config must be a QuantConfig, got {type(config).__name__} "
                        f"{config!r}; pass QuantConfig(format=..., group_size=...){hint}")
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise TypeError(f"{name}: mesh must be a jax.sharding.Mesh (e.g. row_mesh()), got "
                            f"{type(mesh).__name__} {mesh!r}")
        if len(mesh.axis_names) != 1:
            raise ValueError(f"{name}: mesh must be 1-D (rows are split over one axis), got "
                             f"axes {mesh.axis_names}; use row_mesh(devices)")
    if chunk_elements is not None and (not _is_int(chunk_elements) or chunk_elements < 1):
        raise ValueError(f"{name}: chunk_elements={chunk_elements!r} must be a positive integer "
                         "(elements per chunk of rows), or None for the backend's default")
    return config


def _int_range(n_bit: int, symmetric: bool) -> tuple[int, int]:
    """Lowest and highest level of the int-n grid in the scaled domain."""
    half = 2 ** (n_bit - 1)
    return (-half, half - 1) if symmetric else (0, 2**n_bit - 1)


def _grid_range(spec: FormatSpec, symmetric: bool, init: str) -> tuple[float, float]:
    # The int init is the int-n grid itself; nf4 spans the scaled range, which for symmetric
    # scaling is +-(2^(n-1) - 1).
    lo, hi = _int_range(spec.n_bit, symmetric)
    if symmetric and init != "int":
        lo = -hi
    return float(lo), float(hi)


def _any_sample_weights(scale, xbar, ws_shape, g: int, weighting: str):
    """k-means sample weights [R, K] (docs/design.md s.4): 1, xbar_j, or xbar_j * alpha_ij."""
    if weighting == "none":
        return jnp.ones(ws_shape, jnp.float32)
    xbar = xbar if xbar.ndim == 2 else xbar[None, :]  # per row [R, K] or shared [K]
    if weighting == "activations":
        return jnp.broadcast_to(xbar, ws_shape)
    # alpha over a power of two per row (exact, see `pow2_normalize_rows`): the k-means
    # weights keep their ratios but no longer follow the weights' absolute scale.
    return xbar * scaling.expand_groups(pow2_normalize_rows(scale), g)


@functools.partial(jax.jit, static_argnames=("spec", "g", "symmetric", "weighting"))
def _scale_rows(w, xbar, *, spec: FormatSpec, g: int, symmetric: bool, weighting: str):
    """w: [R, K] -> (scale [R, G], zero [R, G], scaled values [R, K], sample weights [R, K])."""
    if spec.family == "table":
        scale, zero, ws = scaling.absmax(w, g)
    else:
        rule = scaling.symmetric if symmetric else scaling.asymmetric
        scale, zero, ws = rule(w, g, spec.n_bit)
    sw = _any_sample_weights(scale, xbar, ws.shape, g, weighting) if spec.family == "any" else None
    return scale, zero, ws, sw


@functools.partial(jax.jit, static_argnames=("spec", "symmetric"))
def _encode_fixed(ws, *, spec: FormatSpec, symmetric: bool):
    """Codes and table of the fixed-table and integer-grid formats: ws [R, K] -> (packed, lut)."""
    r = ws.shape[0]
    if spec.family == "table":
        # Nearest table value with ties to the lower one (bitsandbytes' rule): the slot in the
        # sorted table, then the code that slot holds.
        order = np.argsort(spec.fixed_table, kind="stable")  # stable: +0 before -0 in fp4
        srt = jnp.broadcast_to(jnp.asarray(spec.fixed_table[order]), (r, 16))
        q = jnp.asarray(order.astype(np.int32))[assign_sorted_codes(ws, srt)]
        lut = jnp.broadcast_to(jnp.asarray(spec.fixed_table), (r, 16))
    else:
        lo, hi = _int_range(spec.n_bit, symmetric)
        q = jnp.clip(jnp.round(ws), lo, hi).astype(jnp.int32) - lo  # round half to even
        lut = jnp.broadcast_to(jnp.asarray(int_grid_table(spec.n_bit)), (r, 16))
    return pack_codes(q), lut


def _codes_and_table(ws, c, *, spec: FormatSpec, symmetric: bool):
    """Codes of ws [R, K] against the sorted centroids c [R, k] -> (packed codes, lut [R, 16])."""
    q = assign_sorted_codes(ws, c)
    table = c if symmetric else c - 2 ** (spec.n_bit - 1)
    return pack_codes(q), jnp.pad(table, ((0, 0), (0, 16 - spec.n_levels)))


def _encode_any_rows(ws, xs, sws, row_ids, *, spec: FormatSpec, symmetric: bool,
                     kmeans: KMeansConfig):
    """Learned tables: k-means on the sorted rows (xs, sws), then codes of ws in its order."""
    if kmeans.method == "optimal":
        c, _ = optimal_kmeans_rows(xs, sws, k=spec.n_levels)
        iters = jnp.zeros(ws.shape[:1], jnp.int32)  # no iterations: reported as 0
    else:
        grid = _grid_range(spec, symmetric, kmeans.init)
        c, iters = kmeans_rows(xs, sws, row_ids, k=spec.n_levels, config=kmeans, grid=grid)
    return *_codes_and_table(ws, c, spec=spec, symmetric=symmetric), iters


def _encode_any_rows_cpu(ws, sws, row_ids, *, spec: FormatSpec, symmetric: bool,
                         kmeans: KMeansConfig):
    """Learned tables with the compiled CPU k-means (it sorts the rows itself)."""
    k = spec.n_levels
    if kmeans.method == "optimal":
        c, _ = optimal_rows_cpu(ws, sws, k=k)
        iters = jnp.zeros(ws.shape[:1], jnp.int32)
    else:
        plusplus = kmeans.init == "kmeans++"
        if plusplus:
            init = jnp.zeros((ws.shape[0], k), jnp.float32)
        else:
            lo, hi = _grid_range(spec, symmetric, kmeans.init)
            init = grid_init(ws.shape[0], k, lo, hi, kmeans.init)
        c, iters = kmeans_rows_cpu(ws, sws, row_ids, init, k=k, max_iter=kmeans.max_iter,
                                   tol=kmeans.tol, seed=kmeans.seed, plusplus=plusplus)
    return *_codes_and_table(ws, c, spec=spec, symmetric=symmetric), iters


def _use_cpu_kmeans(kmeans: KMeansConfig) -> bool:
    if jax.default_backend() != "cpu":
        return False
    if kmeans.method == "optimal":
        return kmeans_cpu.available_optimal()
    return kmeans.init != "random" and kmeans_cpu.available()


@functools.lru_cache(maxsize=64)
def _encode_any_fn(spec: FormatSpec, symmetric: bool, kmeans: KMeansConfig, mesh: Mesh | None,
                   cpu: bool = False):
    """The jitted k-means + encode step; with a mesh, each device runs the very program of the
    unsharded case on its own rows (shard_map), which keeps the results bit-identical (letting
    the SPMD partitioner rewrite the loop changes how XLA fuses and rounds)."""
    fn = functools.partial(_encode_any_rows_cpu if cpu else _encode_any_rows, spec=spec,
                           symmetric=symmetric, kmeans=kmeans)
    if mesh is not None:
        rows = PartitionSpec(mesh.axis_names[0])
        n_in = 3 if cpu else 4
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(rows,) * n_in, out_specs=(rows,) * 3,
                           check_vma=False)
    return jax.jit(fn)


def _quantize_chunk(w, xbar, row_ids, *, config: QuantConfig, g: int, mesh: Mesh | None):
    """One chunk of rows -> (packed codes, lut, scales, zeros, k-means iterations)."""
    spec = config.spec
    put = (lambda a: a) if mesh is None else functools.partial(_shard_rows, mesh=mesh)
    scale, zero, ws, sw = _scale_rows(put(w), xbar, spec=spec, g=g, symmetric=config.symmetric,
                                      weighting=config.sample_weighting)
    if spec.family != "any":
        codes, lut = _encode_fixed(ws, spec=spec, symmetric=config.symmetric)
        return codes, lut, scale, zero, jnp.zeros(w.shape[:1], jnp.int32)
    if _use_cpu_kmeans(config.kmeans):
        encode = _encode_any_fn(spec, config.symmetric, config.kmeans, mesh, cpu=True)
        codes, lut, iters = encode(ws, sw, put(row_ids))
        return codes, lut, scale, zero, iters
    xs, sws = sort_rows_auto(ws, sw)
    encode = _encode_any_fn(spec, config.symmetric, config.kmeans, mesh)
    codes, lut, iters = encode(ws, put(xs), put(sws), put(row_ids))
    return codes, lut, scale, zero, iters


def quantize_weight(
    w,
    config: QuantConfig | None = None,
    *,
    sample_weight=None,
    mesh: Mesh | None = None,
    chunk_elements: int | None = None,
    name: str = "weight",
    return_info: bool = False,
    progress: bool = False,
    codebooks=None,
):
    """Quantizes one weight matrix.

    w: [N, K] (out_features x in_features; transpose a Flax kernel first).
    sample_weight: [K] per-input-channel activation statistic (xbar) for any-n; see
      `QuantConfig.sample_weighting`. Or [m, K] with m dividing N: one statistic per block of
      N/m consecutive rows (stacked experts: one per expert).
    mesh: a 1-D mesh (see `row_mesh`) to split the rows of each chunk over its devices.
    chunk_elements: rows are processed in chunks of about this many elements (memory bound).
    progress: show a progress bar over the row chunks (useful for very large matrices).
    codebooks: format "bcq" only: universal codebooks [n_codebooks, 16] to encode with (e.g.
      `BCQCodebooks.load(path).weights`); None learns local ones on this matrix.
    Returns a `QuantizedWeight` (a `BCQWeight` for "bcq"; and, with return_info, a dict of
    k-means iteration counts or the bcq fit's MSE and iterations).

    Every argument is checked before any work: TypeError for a config, mesh, name or
    sample_weight of the wrong type; ValueError for an empty, non-2-D, non-float or
    non-finite weight, one whose largest |w| exceeds `max_abs_limit` of the storage dtype,
    a group size that does not divide K, or a bad sample_weight or chunk_elements.
    """
    config = _check_arguments(config, mesh, chunk_elements, name)
    spec = config.spec
    _check_structure(w, name)
    out_dtype = jnp.dtype(config.dtype or w.dtype)
    n, k = w.shape
    xbar = _validate_sample_weight(sample_weight, n, k, name)
    if spec.family == "bcq":
        return _quantize_bcq(w, config, sample_weight, xbar, codebooks, name=name,
                             return_info=return_info, progress=progress)
    if codebooks is not None:
        raise ValueError(f"{name}: codebooks apply to format='bcq' only, not {spec.name!r}; "
                         "drop codebooks=")
    g = config.resolve_group_size(k, name=name)
    w = validate_weight(w, name=name, storage_dtype=out_dtype)  # a pass over w: the last check

    n_dev = 1 if mesh is None else mesh.size
    budget = chunk_elements or _CHUNK_ELEMENTS.get(jax.default_backend(), 1 << 22)
    per_dev = max(_MIN_ROWS_PER_DEVICE, budget // k // n_dev)
    per_dev = min(per_dev, max(_MIN_ROWS_PER_DEVICE, -(-n // n_dev)))  # small matrix: no big pad
    rows = per_dev * n_dev

    outs = []
    starts = range(0, n, rows)
    if progress and n > rows:  # a bar only when there is more than one chunk
        starts = tqdm(starts, desc=f"{name} [{n}x{k}] {spec.name}", unit="chunk", leave=False)
    for start in starts:
        stop = min(start + rows, n)
        wc = w[start:stop]
        ids = jnp.arange(start, start + rows, dtype=jnp.int32)
        if stop - start < rows:  # pad the last chunk to the common shape (one compilation)
            wc = jnp.pad(wc, ((0, rows - (stop - start)), (0, 0)))
        # per-block statistics: each row of the chunk gets its block's (chunk-sized memory)
        xc = xbar if xbar.ndim == 1 else xbar[jnp.minimum(ids, n - 1) // (n // xbar.shape[0])]
        res = _quantize_chunk(wc, xc, ids, config=config, g=g, mesh=mesh)
        outs.append([a[: stop - start] for a in res])
    codes, lut, scales, zeros, iters = (
        jnp.concatenate([o[i] for o in outs]) if len(outs) > 1 else outs[0][i] for i in range(5)
    )
    qw = QuantizedWeight(
        codes=codes,
        lut=lut.astype(out_dtype),
        scales=scales.astype(out_dtype),
        zeros=zeros.astype(out_dtype),
        format=spec.name,
        n_bit=spec.n_bit,
        group_size=g,
        symmetric=bool(config.symmetric or spec.family == "table"),
        shape=(n, k),
        dtype=jnp.dtype(w.dtype).name,
    ).check()
    if not return_info:
        return qw
    info = {"rows": n, "chunks": len(outs), "rows_per_chunk": rows}
    if spec.family == "any":
        it = np.asarray(iters)
        info.update(kmeans_iters_mean=float(it.mean()), kmeans_iters_max=int(it.max()))
    return qw, info


def _quantize_bcq(w, config, sample_weight, xbar, codebooks, *, name, return_info, progress):
    if xbar.ndim != 1:
        raise ValueError(f"{name}: format 'bcq' takes one statistic per input channel "
                         f"(sample_weight of shape ({w.shape[1]},)), got {tuple(xbar.shape)}")
    check_bcq_shape(w.shape[1], config.block_len, config.array_len, name=name)
    w = validate_weight(w, name=name)  # a pass over w: the last check
    qw, info = quantize_bcq(w, config, xbar=None if sample_weight is None else xbar,
                            codebooks=codebooks, fit=config.bcq_fit, name=name,
                            progress=progress)
    return (qw, {"rows": w.shape[0], **info}) if return_info else qw


def _shard_rows(a, *, mesh: Mesh):
    spec = PartitionSpec(mesh.axis_names[0], *([None] * (a.ndim - 1)))
    return jax.device_put(a, NamedSharding(mesh, spec))
