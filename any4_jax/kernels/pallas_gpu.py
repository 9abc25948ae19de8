"""The LUT-dequantizing GEMM in Pallas (Triton backend): `implementation="pallas"`.

y[m, n] = sum_k x[m, k] * (lut[n, code[n, k]] * scale[n, k // g] + zero[n, k // g])

Grid: (N / BN, M_padded / BM, split_k); each program owns a [BM, BN] output tile and walks K in
blocks of BK (BK divides g, so one scale and one zero per row and block). Per block:
  1. load the packed codes [BN, BK/2] (uint8): element 2j is the low nibble, 2j+1 the high;
     instead of interleaving the nibbles, the activations come pre-split into even and odd
     columns (x_even, x_odd: [M, K/2], a cheap XLA slice of the small activation matrix);
  2. table lookup, one of three (`lookup` in the config; the integer formats skip the table,
     value = code - 2^(n-1), exact):
     "select": a 4-level binary select tree on the code bits over the row's 16 table entries
       held in registers (15 selects + 4 bit tests per weight; a gather from a value does not
       lower in Pallas-Triton);
     "gather": a load from the table's ref at computed addresses, `lut_ref[rows, codes]`
       (Triton: a pointer-tensor load per weight, served by L1: a program's tables are
       BN x 16 entries);
     "pair": one load per code byte from the weight's pair table ([N, 256] uint32, entry b =
       the raw values of codes b & 15 and b >> 4 as two 16-bit halves; `pair_table`, prepared
       once per weight and passed as `pairs=`): no nibble extraction, half the loads and
       address arithmetic. Post-scale inputs only (otherwise "gather" runs). Its cost is
       bytes: 1 KB per row, half as many bytes again as the codes for K = 4096;
  3. dequantize, one of two (`post_scale`):
     False: in float32 with one multiply-add per weight (as the reference does, so an
       identity activation returns the dequantized weight bit for bit), cast to x's dtype;
     True: raw table values go to the MMA in x's dtype (exact: the table is stored in the
       model's dtype) and the block's scale and zero act on the [BM, BN] partial sums,
       y += (x . t) * s + (sum x) * z, per output instead of per weight, with the sums of x
       per K block reduced once in XLA (a tiny [M, K/BK] input) rather than in every program;
       integer codes become floats by a magic-number OR. Only for 16-bit x with a table of
       x's dtype (otherwise the per-weight path runs). More accurate than the reference,
       which rounds each weight to x's dtype before the product;
  4. two MMAs (even and odd halves) into a float32 accumulator, the weight block as the MMA's
     16-row operand (acc [BN, BM] = W . x^T, transposed once at the store: fewer registers
     and operand moves than x . W^T, as in tinygemm).
Instruction counts per weight of the K loop on Llama-3-8B gate/up, M=1, sm_90, from the SASS
(`scripts/sass_count.py pallas`, no GPU needed): select 19.2, gather 12.3, gather +
post-scale 9.3, pair + post-scale 5.5 (int4: 7.1 -> 5.2). The rule of thumb
(`tuning.default_config`) takes gather + post-scale, the cheapest without extra bytes; the
tuner measures the others, and `lut_matmul` does not make pair tables (a caller passes them to
`lut_matmul_pallas`). Measured times: docs/kernels.md.
The table, scales and zeros are read in their canonical [N, 16 | K/g] layout: a program loads
its BN rows' 16 table entries once (one [BN, 1] column per entry) and one [BN, 1] column of
scales and zeros per K block, so no per-call transpose or re-layout runs in XLA.

Compiler parameters are passed explicitly (`plgpu.CompilerParams`): jax 0.10 and 0.11 differ
in their default GPU backend for Pallas.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from any4_jax.kernels.limits import multiple_reasons
from any4_jax.kernels.tuning import PallasConfig, block_config, dense_threshold
from any4_jax.quant.qweight import QuantizedWeight

NAME = "any4_lut_matmul"
# the lookup variants by name (config keys; tuner, benchmarks and SASS counts use these names).
# "pair" reads a pair table (`pair_table`, passed as `pairs=`) and is a post-scale lookup only
VARIANTS = {**{f"{lookup}{'+post' if post else ''}": {"lookup": lookup, "post_scale": post}
               for lookup in ("select", "gather") for post in (False, True)},
            "pair+post": {"lookup": "pair", "post_scale": True}}


def _lookup(codes, lut_rows, *, int_offset):
    """codes: [BN, BK2] int32 in [0, 16); lut_rows: 16 arrays [BN, 1] -> values [BN, BK2]."""
    if int_offset is not None:
        return codes.astype(jnp.float32) - float(int_offset)
    level = [lut_rows[i] for i in range(16)]
    for bit in range(4):  # 16 -> 8 -> 4 -> 2 -> 1 candidates, selected by bit 0, 1, 2, 3
        b = (codes & (1 << bit)) != 0
        level = [jnp.where(b, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


# x.dtype -> (bits, value) with bitcast(bits | c) == value + c for every 4-bit code c: the
# integer-to-float conversion of a code as one integer OR (the mantissa's low bits are c)
_MAGIC = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0), jnp.dtype(jnp.float16): (0x6400, 1024.0)}


def _int_values(codes, int_offset, dtype):
    """Integer-grid values code - offset as `dtype`, exactly."""
    if jnp.dtype(dtype) in _MAGIC:
        bits, base = _MAGIC[jnp.dtype(dtype)]
        v = lax.bitcast_convert_type((codes | bits).astype(jnp.uint16), dtype)
        return v - jnp.asarray(base + int_offset, dtype)  # small integers: exact
    return (codes - int_offset).astype(dtype)


def _gather(codes, lut_ref, rows, *, int_offset):
    """The table lookup as a load from the table's ref at computed addresses (Triton: one
    pointer-tensor load per weight, served by L1: a program's tables are BN x 16 entries):
    codes [BN, BK2] int32 -> values [BN, BK2] in the table's dtype."""
    if int_offset is not None:
        return codes - int_offset  # int32, exact in every float dtype
    return lut_ref[rows, codes]


def pair_table(lut: jax.Array) -> jax.Array:
    """The "pair" lookup's table: [N, 16] bfloat16/float16 -> [N, 256] uint32 whose entry b
    holds lut[b & 15] in its low 16 bits and lut[b >> 4] in its high 16 bits (the raw table
    values of the two weights a code byte stands for). Prepare it once per weight (1 KB per
    row: for K = 4096 that is half as many bytes again as the codes) and pass it as
    `lut_matmul_pallas(..., pairs=...)`."""
    if jnp.dtype(lut.dtype) not in _MAGIC:
        raise ValueError(f"pair tables hold 16-bit table values; this table is {lut.dtype} "
                         "(quantize with a bfloat16 or float16 table, or use lookup='gather')")
    if lut.ndim != 2 or lut.shape[1] != 16:
        raise ValueError(f"pair_table takes an [N, 16] table, got shape {tuple(lut.shape)}")
    bits = lax.bitcast_convert_type(lut, jnp.uint16).astype(jnp.uint32)
    b = jnp.arange(256)
    return bits[:, b & 15] | (bits[:, b >> 4] << 16)


def _kernel(xe_ref, xo_ref, codes_ref, lut_ref, scales_ref, zeros_ref, *refs,
            bk: int, g: int, int_offset, precision, lookup: str, post_scale: bool):
    # xe/xo: [BM, K/2]; codes: [BN, K/2]; lut: [BN, 16]; scales/zeros: [BN, K/g]; then with
    # post_scale the block sums of x [BM, K/BK] (float32), with lookup "pair" the pair table
    # [BN, 256] (uint32); last the output
    *extra, o_ref = refs
    xsum_ref = extra.pop(0) if post_scale else None
    pair_ref = extra.pop(0) if lookup == "pair" else None
    bk2 = bk // 2
    n_blocks = xe_ref.shape[1] // bk2
    bm, bn = o_ref.shape
    lut_rows = rows = None
    if lookup == "select" and int_offset is None:
        lut_rows = [lut_ref[:, pl.ds(i, 1)].astype(jnp.float32) for i in range(16)]
    if lookup in ("gather", "pair"):
        rows = lax.broadcasted_iota(jnp.int32, (bn, bk2), 0)
    blocks_per_group = g // bk

    def values(half):  # table values of a [BN, BK2] block of codes
        if post_scale and int_offset is not None:
            return _int_values(half, int_offset, xe_ref.dtype)
        if lookup == "gather":
            return _gather(half, lut_ref, rows, int_offset=int_offset)
        return _lookup(half, lut_rows, int_offset=int_offset)

    def dot(x, w):  # W . x^T: [BN, BK2] x [BM, BK2] -> [BN, BM] float32 (y transposed)
        return lax.dot_general(w.astype(x.dtype), x, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32, precision=precision)

    def body(kb, acc):
        sl = pl.ds(kb * bk2, bk2)
        packed = codes_ref[:, sl].astype(jnp.int32)  # [BN, BK2]
        grp = kb // blocks_per_group
        xe = xe_ref[:, sl]
        xo = xo_ref[:, sl]
        s = scales_ref[:, pl.ds(grp, 1)].astype(jnp.float32)  # [BN, 1]
        z = zeros_ref[:, pl.ds(grp, 1)].astype(jnp.float32)
        if post_scale:
            # raw table values into the MMA; the block's scale and zero act on its [BN, BM]
            # partial sums, y^T += (t . x^T) * s + z * (sum x), per output element instead of
            # per weight (the block sums of x come precomputed: an XLA reduction)
            if pair_ref is not None:  # one load per code byte: both weights' raw values
                w = pair_ref[rows, packed]  # uint32 [BN, BK2]
                ve = lax.bitcast_convert_type((w & 0xFFFF).astype(jnp.uint16), xe.dtype)
                vo = lax.bitcast_convert_type((w >> 16).astype(jnp.uint16), xe.dtype)
            else:
                ve, vo = values(packed & 0xF), values(packed >> 4)
            return acc + (dot(xe, ve) + dot(xo, vo)) * s + xsum_ref[:, kb][None, :] * z
        for half, x in ((packed & 0xF, xe), (packed >> 4, xo)):
            w = values(half).astype(jnp.float32) * s + z  # [BN, BK2] f32
            acc += dot(x, w)
        return acc

    acc = lax.fori_loop(0, n_blocks, body, jnp.zeros((bn, bm), jnp.float32))
    o_ref[...] = acc.T.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("g", "int_offset", "interpret", "bm", "bn", "bk",
                                             "num_warps", "num_stages", "lookup", "post_scale",
                                             "split_k"))
def _call(x2, codes, lut, scales, zeros, pairs, *, g, int_offset, interpret, bm, bn, bk,
          num_warps, num_stages, lookup="select", post_scale=False, split_k=1):
    m, k = x2.shape
    n = codes.shape[0]
    mp = -(-m // bm) * bm
    x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    xe, xo = x2[:, 0::2], x2[:, 1::2]  # [Mp, K/2] each
    precision = lax.Precision.HIGHEST if x2.dtype == jnp.float32 else None
    # post-scale feeds raw table values to the MMA in x's dtype: exact only when the table is
    # already in that dtype (a bf16 table is not exact in f16); float32 activations keep the
    # per-weight dequantization, whose identity products equal the reference bit for bit
    post_scale = post_scale and x2.dtype != jnp.float32 and (
        int_offset is not None or lut.dtype == x2.dtype)
    if lookup == "pair" and not (post_scale and int_offset is None and pairs is not None):
        lookup = "gather"  # the pair table holds raw 16-bit values: post-scale inputs only
    kernel = functools.partial(_kernel, bk=bk, g=g, int_offset=int_offset,
                               precision=precision, lookup=lookup, post_scale=post_scale)
    ks = k // split_k  # the K range of one program: whole groups (checked by _config)
    inputs = [xe, xo, codes, lut, scales, zeros]
    in_specs = [
        pl.BlockSpec((bm, ks // 2), lambda i, j, s: (j, s)),
        pl.BlockSpec((bm, ks // 2), lambda i, j, s: (j, s)),
        pl.BlockSpec((bn, ks // 2), lambda i, j, s: (i, s)),
        pl.BlockSpec((bn, 16), lambda i, j, s: (i, 0)),
        pl.BlockSpec((bn, ks // g), lambda i, j, s: (i, s)),
        pl.BlockSpec((bn, ks // g), lambda i, j, s: (i, s)),
    ]
    if post_scale:  # the sums of x per K block, float32 [Mp, K/BK] (a small XLA reduction)
        inputs.append(x2.astype(jnp.float32).reshape(mp, k // bk, bk).sum(axis=2))
        in_specs.append(pl.BlockSpec((bm, ks // bk), lambda i, j, s: (j, s)))
    if lookup == "pair":
        inputs.append(pairs)
        in_specs.append(pl.BlockSpec((bn, 256), lambda i, j, s: (i, 0)))
    if split_k == 1:
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (j, i))
        out_shape = jax.ShapeDtypeStruct((mp, n), x2.dtype)
    else:  # float32 partial products, one [Mp, N] slice per K split, summed below
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, j, i))
        out_shape = jax.ShapeDtypeStruct((split_k, mp, n), jnp.float32)
    out = pl.pallas_call(
        kernel,
        grid=(n // bn, mp // bm, split_k),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=NAME,
    )(*inputs)
    if split_k > 1:
        out = out.sum(axis=0).astype(x2.dtype)
    return out[:m]


def _config(config: PallasConfig | None, overrides: dict, *, m: int, n: int, k: int,
            g: int) -> PallasConfig:
    """`config` (default: the tuning table's for this shape) with `overrides` applied, checked:
    every problem named, with the constraint."""
    if config is None:
        config = block_config(m=m, n=n, k=k, g=g)
    elif not isinstance(config, PallasConfig):
        raise TypeError(f"config must be a PallasConfig, got {type(config).__name__}; pass "
                        "single settings as keywords instead (e.g. lookup='select')")
    cfg = config.replace(**overrides)
    problems = cfg.problems(n=n, k=k, g=g)
    if problems:
        raise ValueError(f"{cfg}: " + "; ".join(problems))
    return cfg


def lut_matmul_pallas(x: jax.Array, qweight: QuantizedWeight, *, interpret: bool = False,
                      config: PallasConfig | None = None, pairs: jax.Array | None = None,
                      **overrides) -> jax.Array:
    """x: [..., K] -> [..., N]; `interpret=True` runs the kernel on any backend (tests).
    `config`: a `PallasConfig` (default: the tuning table's for this shape); `overrides`:
    single fields of it by keyword (bm, bn, bk, num_warps, num_stages, lookup "select" |
    "gather" | "pair", post_scale, split_k).

    `pairs`: the weight's `pair_table(qweight.lut)`, prepared once: the kernel then looks up
    both weights of a code byte with one load (lookup "pair", post-scale; unless `config`
    names another lookup). It applies to 16-bit x with a table of x's dtype; other inputs take
    the "gather" path.
    """
    n, k = qweight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if pairs is not None:
        if tuple(pairs.shape) != (n, 256) or jnp.dtype(pairs.dtype) != jnp.dtype(jnp.uint32):
            raise ValueError(f"pairs must be the [{n}, 256] uint32 table pair_table(qweight.lut) "
                             f"of this weight; got {pairs.dtype} {tuple(pairs.shape)}")
        if config is None:
            overrides = {"lookup": "pair", "post_scale": True, **overrides}
    cfg = _config(config, overrides, m=x2.shape[0], n=n, k=k, g=qweight.group_size)
    if cfg.lookup == "pair" and pairs is None:
        raise ValueError("lookup='pair' reads a pair table: pass pairs=pair_table(qweight.lut) "
                         "(from any4_jax.kernels.pallas_gpu; prepared once per weight), or use "
                         "lookup='gather'")
    y = _call(x2, qweight.codes, qweight.lut, qweight.scales, qweight.zeros, pairs,
              g=qweight.group_size, int_offset=qweight.int_grid_offset(), interpret=interpret,
              **cfg.to_dict())
    return y.reshape(*lead, n)


def can_use_pallas(x, qweight: QuantizedWeight, *, interpret: bool = False) -> list[str]:
    reasons = []
    n, k = qweight.shape
    if not interpret and jax.default_backend() != "gpu":
        reasons.append(f"the Pallas kernel needs a CUDA GPU (jax's backend is "
                       f"{jax.default_backend()!r})")
    reasons += multiple_reasons(n=n, g=qweight.group_size, n_multiple=16, g_multiple=32,
                                why="the kernel's smallest tile")
    m = math.prod(x.shape[:-1])  # rows of x
    limit = dense_threshold(n=n, k=k)
    if m > limit:
        reasons.append(f"M={m} rows exceed {limit}, above which dequantize-then-dense is "
                       "the faster path (tuning table)")
    return reasons
