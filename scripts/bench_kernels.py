"""LUT-GEMM kernels vs the reference and dense bf16 on real Llama shapes (run on a GPU).

    python scripts/bench_kernels.py [--ms 1,4,16,64] [--group-size 128] [--format any4]
                                    [--shapes llama3-8b/gate_up,...|NxK] [--out benchmarks/results]

For each shape and M: median time of the reference path (`implementation="xla"`: dequantize,
then a dense GEMM), the Pallas kernel (as configured, and at the same block sizes unless
--no-pallas-variants: the select tree with and without split K, gather without post-scaling,
and the "pair" lookup, whose pair tables, 1 KB per row, are prepared once per weight copy and
counted in its bytes), the CUDA kernel when built (the default kernel, and unless
--no-cuda-variants each of the library's kernels: scaled, unit_pair, unit_lane), and a dense
bf16 `x @ W.T`;
achieved bytes/s of each quantized path (its own layout's codes + scales + zeros + table, plus
activations and output) against the device's copy bandwidth measured here. Each
implementation gets its weight layout prepared once, outside the timed call (as QuantDense
does), e.g. the CUDA kernel's fragment-ordered codes. Weight copies are rotated so the
L2 cache is not what gets measured (see kernel_timing.py). Writes JSON named after the GPU and
prints a markdown table. On a CPU it times the reference, the CPU kernel and a float32 dense
GEMM (`--dtype`); the GPU kernels decline there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from kernel_timing import copies_for, copy_bandwidth, time_per_call  # noqa: E402

from any4_jax.kernels import pallas_gpu  # noqa: E402

IMPLS = ("xla", "pallas", "cuda", "cpu")
NAMES = {"xla": "reference", "pallas": "Pallas", "cuda": "CUDA", "cpu": "CPU kernel",
         "pallas_unsplit": "Pallas select, no split", "pallas_select": "Pallas select",
         "pallas_gather": "Pallas gather", "pallas_pair": "Pallas pair+post",
         "cuda_scaled": "CUDA scaled", "cuda_unit_pair": "CUDA unit pair",
         "cuda_unit_lane": "CUDA unit lane"}
# Pallas variants timed beside the configured kernel ("pallas": tuning table or rule, the rule
# being gather + post-scale) at its block sizes, so that their ratios come from one run
# (pallas_gpu.py): the select tree without split K (the configuration of the first GPU
# timings) and with it, gather without post-scaling, and the pair lookup (with its prepared
# pair tables)
PALLAS_VARIANTS = {"pallas_unsplit": {**pallas_gpu.VARIANTS["select"], "split_k": 1},
                   "pallas_select": pallas_gpu.VARIANTS["select"],
                   "pallas_gather": pallas_gpu.VARIANTS["gather"],
                   "pallas_pair": pallas_gpu.VARIANTS["pair+post"]}
# The CUDA library's kernels (cuda_ffi.KERNELS), each timed beside the default one ("cuda")
CUDA_VARIANTS = {"cuda_scaled": "scaled", "cuda_unit_pair": "unit_pair",
                 "cuda_unit_lane": "unit_lane"}


def _qweights(n, k, fmt, g, copies, seed=0, dtype=jnp.bfloat16):
    """`copies` random QuantizedWeights (distinct buffers; contents do not matter for timing
    and k-means on the large shapes would cost more than the measurement) and a dense
    weight of the same shape."""
    from any4_jax.quant.qweight import random_qweight

    key = jax.random.key(seed)
    qws = [random_qweight(jax.random.fold_in(key, i), n, k, fmt=fmt, group_size=g, dtype=dtype)
           for i in range(copies)]
    w = 0.02 * jax.random.normal(jax.random.fold_in(key, 2**20), (n, k), jnp.float32)
    w = w.astype(dtype)
    return qws, w


def main():
    from any4_jax.kernels import can_use, lut_matmul, prepare
    from any4_jax.kernels.cuda_ffi import default_kernel, lut_matmul_cuda
    from any4_jax.kernels.pallas_gpu import lut_matmul_pallas
    from any4_jax.kernels.tuning import block_config
    from any4_jax.shapes import LLAMA_SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="1,4,16,64")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--format", default="any4", choices=("any4", "int4"))
    ap.add_argument("--shapes", default=",".join(LLAMA_SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="activations and dense weights (default: bfloat16 on a GPU, float32 "
                         "on a CPU)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-pallas-variants", action="store_true",
                    help="time only the configured Pallas kernel, not its lookup variants")
    ap.add_argument("--no-cuda-variants", action="store_true",
                    help="time only the default CUDA kernel, not each of the library's kernels")
    args = ap.parse_args()
    dt = jnp.dtype(args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32"))

    dev = jax.devices()[0]
    bw = copy_bandwidth(2**30 if dev.platform == "gpu" else 2**26)
    print(f"device: {dev.device_kind}; copy bandwidth {bw / 1e9:.0f} GB/s", file=sys.stderr)
    rows = []
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"kernels_{dev.device_kind.lower().replace(' ', '_')}.json"

    def save():  # after every row: a run cut short by a time limit keeps what it measured
        rec = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
               "dtype": dt.name, "copy_bandwidth_bytes_per_s": bw, "format": args.format,
               "group_size": args.group_size, "cuda_kernel": default_kernel(), "rows": rows,
               "command": "python scripts/bench_kernels.py " + " ".join(sys.argv[1:])}
        path.write_text(json.dumps(rec, indent=2))

    for name in args.shapes.split(","):
        if name in LLAMA_SHAPES:
            n, k = LLAMA_SHAPES[name]
        elif re.fullmatch(r"\d+x\d+", name):
            n, k = map(int, name.split("x"))  # N x K, e.g. for a quick check
        else:
            ap.error(f"--shapes: unknown {name!r}; give one of {', '.join(LLAMA_SHAPES)} or NxK")
        one, _ = _qweights(n, k, args.format, args.group_size, 1, dtype=dt)
        qbytes = one[0].nbytes()
        copies = copies_for(qbytes)
        qws, w = _qweights(n, k, args.format, args.group_size, copies, dtype=dt)
        dense = [w + 0 for _ in range(copies_for(n * k * dt.itemsize))]
        # each implementation reads its own layout, prepared once (as QuantDense does)
        prepared = {impl: [prepare(q, impl) for q in qws] for impl in IMPLS
                    if not can_use(impl, jnp.zeros((1, k), dt), qws[0])}
        pairs = None  # the pair lookup's tables, made on first use
        for m in (int(s) for s in args.ms.split(",")):
            x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), dt)
            act = (x.size + m * n) * dt.itemsize
            row = {"shape": name, "n": n, "k": k, "m": m, "bytes": qbytes + act,
                   "dense_bytes": n * k * dt.itemsize + act}
            row["dense_s"] = time_per_call(lambda x, w: x @ w.T, x, dense, reps=args.reps)
            row["dense_bw_fraction"] = row["dense_bytes"] / row["dense_s"] / bw
            if row["dense_bw_fraction"] > 1.05:  # faster than memory allows: a broken timing
                print(f"warning: {name} M={m}: dense timing implies "
                      f"{100 * row['dense_bw_fraction']:.0f}% of copy bandwidth; not trusted",
                      file=sys.stderr)
            runs = [(impl, impl, None) for impl in IMPLS]
            if not args.no_cuda_variants:
                runs[3:3] = [(col, "cuda", v) for col, v in CUDA_VARIANTS.items()]
            if not args.no_pallas_variants:
                runs[2:2] = [(col, "pallas", v) for col, v in PALLAS_VARIANTS.items()]
            for col, impl, variant in runs:
                reasons = can_use(impl, x, qws[0])
                if reasons or impl not in prepared:
                    row[f"{col}_s"] = None
                    row[f"{col}_declined"] = reasons or ["declined at M=1"]
                    continue
                ws = prepared[impl]
                io = ws[0].nbytes() + act
                cfg = None
                if impl == "pallas" and variant is not None:
                    cfg = {**block_config(m=m, n=n, k=k, g=args.group_size), **variant}
                    row[f"{col}_config"] = cfg
                if variant is None:
                    def call(x, q, impl=impl):
                        return lut_matmul(x, q, implementation=impl)
                elif impl == "cuda":
                    def call(x, q, kernel=variant):
                        return lut_matmul_cuda(x, q, kernel=kernel)
                elif variant["lookup"] == "pair":  # weight copies with their pair tables
                    def call(x, qp, cfg=cfg):
                        return lut_matmul_pallas(x, qp[0], config=cfg, pairs=qp[1])
                else:
                    def call(x, q, cfg=cfg):
                        return lut_matmul_pallas(x, q, config=cfg)
                try:
                    if impl == "pallas" and variant is not None and variant["lookup"] == "pair":
                        pairs = pairs or [(q, pallas_gpu.pair_table(q.lut)) for q in ws]
                        ws, io = pairs, io + pairs[0][1].nbytes
                    t = time_per_call(call, x, ws, reps=args.reps)
                except Exception as e:  # noqa: BLE001 - one failing kernel must not stop all
                    row[f"{col}_s"] = None
                    row[f"{col}_declined"] = [f"failed: {type(e).__name__}: {str(e)[:500]}"]
                    print(f"{name} M={m} {col}: {row[f'{col}_declined'][0]}", file=sys.stderr)
                    continue
                row[f"{col}_s"] = t
                row[f"{col}_bytes"] = io
                row[f"{col}_bw_fraction"] = io / t / bw
            rows.append(row)
            save()
            print(json.dumps({k2: v for k2, v in row.items() if not k2.endswith("declined")}),
                  file=sys.stderr)
    save()

    def us(t):
        return "-" if t is None else f"{t * 1e6:.1f}"

    cols = [*IMPLS[:2], *PALLAS_VARIANTS, IMPLS[2], *CUDA_VARIANTS, *IMPLS[3:]]
    ran = [i for i in cols if any(r.get(f"{i}_s") is not None for r in rows)]
    fast = [i for i in ran if i != "xla"]
    head = (["shape (N x K)", "M", f"dense {dt.name} (us)"] + [f"{NAMES[i]} (us)" for i in ran]
            + [f"{NAMES[i]} vs dense" for i in fast]
            + [f"{NAMES[i]} % of copy BW" for i in fast])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        def ratio(impl, r=r):
            t = r.get(f"{impl}_s")
            return "-" if t is None else f"{r['dense_s'] / t:.2f}x"

        def frac(impl, r=r):
            f = r.get(f"{impl}_bw_fraction")
            return "-" if f is None else f"{100 * f:.0f}%"

        cells = ([f"{r['shape']} ({r['n']}x{r['k']})", str(r["m"]), us(r["dense_s"])]
                 + [us(r.get(f"{i}_s")) for i in ran] + [ratio(i) for i in fast]
                 + [frac(i) for i in fast])
        print("| " + " | ".join(cells) + " |")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
