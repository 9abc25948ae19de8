"""The LUT-GEMM kernels on real Llama shapes: time them, tune the Pallas kernel, profile them.

    python scripts/kernel_bench.py bench   [--shapes llama3-8b/gate_up,...|NxK] [--ms 1,4,16,64]
    python scripts/kernel_bench.py tune    [--shapes ...] [--buckets 16,64] [--write] [--smoke]
    python scripts/kernel_bench.py profile [--shapes ...] [--ms 1,16] [--impls cuda,pallas,dense]

`MODE --help` says what each does and takes. Timings rotate weight copies so that the L2 cache
is not what gets measured (`any4_jax/timing.py`).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax import QuantConfig, quantize_weight
from any4_jax.kernels import can_use, lut_matmul, prepare, tuning
from any4_jax.kernels.cuda_ffi import default_kernel, lut_matmul_cuda
from any4_jax.kernels.pallas_gpu import VARIANTS, lut_matmul_pallas, pair_table
from any4_jax.kernels.reference import lut_matmul_reference
from any4_jax.quant.qweight import random_qweight
from any4_jax.shapes import LLAMA_SHAPES
from any4_jax.timing import (
    copies_for,
    copy_bandwidth,
    cuda_profiler_range,
    descend,
    time_once,
    time_per_call,
)

IMPLS = ("xla", "pallas", "cuda", "cpu")
NAMES = {"xla": "reference", "pallas": "Pallas", "cuda": "CUDA", "cpu": "CPU kernel",
         "pallas_unsplit": "Pallas select, no split", "pallas_select": "Pallas select",
         "pallas_gather": "Pallas gather", "pallas_pair": "Pallas pair+post",
         "cuda_scaled": "CUDA scaled", "cuda_unit_pair": "CUDA unit pair",
         "cuda_unit_lane": "CUDA unit lane", "torch_int4": "torch int4 (bf16 x)"}
# bench: Pallas variants timed beside the configured kernel ("pallas": tuning table or rule,
# the rule being gather + post-scale) at its block sizes, so that their ratios come from one
# run (pallas_gpu.py): the select tree without split K (the configuration of the first GPU
# timings) and with it, gather without post-scaling, and the pair lookup (with its prepared
# pair tables)
PALLAS_VARIANTS = {"pallas_unsplit": {**VARIANTS["select"], "split_k": 1},
                   "pallas_select": VARIANTS["select"], "pallas_gather": VARIANTS["gather"],
                   "pallas_pair": VARIANTS["pair+post"]}
# bench: the CUDA library's kernels (cuda_ffi.KERNELS), each timed beside the default ("cuda")
CUDA_VARIANTS = {"cuda_scaled": "scaled", "cuda_unit_pair": "unit_pair",
                 "cuda_unit_lane": "unit_lane"}
# tune: the lookup variants searched (select + post-scale is left out: no cheaper than select
# by instruction count, `sass_count.py pallas`; the pair lookup too: it needs a pair table
# prepared per weight, which `lut_matmul`'s automatic path does not have; `bench` times it)
TUNED_VARIANTS = {name: v for name, v in VARIANTS.items()
                  if name not in ("select+post", "pair+post")}
# tune: the axes of the search (`timing.descend`), in order, each {label: changes}; the
# variants first: each is timed (and recorded) at the starting block sizes
AXES = [TUNED_VARIANTS,
        {f"split_k={s}": {"split_k": s} for s in (1, 2, 4, 8, 16)},
        {f"bn={b}": {"bn": b} for b in (32, 64, 128)},
        {f"bk={b}": {"bk": b} for b in (64, 128, 256)},
        {f"warps={w},stages={st}": {"num_warps": w, "num_stages": st}
         for w, st in itertools.product((4, 8), (2, 3, 4))}]
CROSSOVER_MS = (32, 64, 128, 256)


# --- shared by the modes -------------------------------------------------------------------

def shapes(ap: argparse.ArgumentParser, names: str) -> list[tuple[str, int, int]]:
    """--shapes: Llama matrix names (any4_jax.shapes) or NxK, e.g. 64x256 for a quick check."""
    out = []
    for name in names.split(","):
        if name in LLAMA_SHAPES:
            out.append((name, *LLAMA_SHAPES[name]))
        elif re.fullmatch(r"\d+x\d+", name):
            out.append((name, *map(int, name.split("x"))))
        else:
            ap.error(f"--shapes: unknown {name!r}; give one of {', '.join(LLAMA_SHAPES)} or NxK")
    return out


def activations(m: int, k: int, dtype=jnp.bfloat16) -> jax.Array:
    """x: [m, k], standard normal, seeded by m."""
    return jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), dtype)


def qweights(n, k, fmt, g, copies=None, seed=0, dtype=jnp.bfloat16):
    """`copies` random QuantizedWeights [n, k] (default: enough to exceed the L2 cache;
    distinct buffers; contents do not matter for timing, and k-means on the large shapes
    would cost more than the measurement) and a dense weight [n, k] of the same dtype."""
    key = jax.random.key(seed)
    make = lambda i: random_qweight(jax.random.fold_in(key, i), n, k, fmt=fmt, group_size=g,
                                    dtype=dtype)
    copies = copies or copies_for(make(0).nbytes())
    w = 0.02 * jax.random.normal(jax.random.fold_in(key, 2**20), (n, k), jnp.float32)
    return [make(i) for i in range(copies)], w.astype(dtype)


def torch_int4_seconds(n: int, k: int, g: int, m: int, reps: int) -> tuple[float, int] | None:
    """On a CPU with torch: seconds per call of torch's tinygemm CPU op
    (`aten._weight_int4pack_mm_for_cpu`, int4 codes, bf16 activations and scales/zeros) on
    [m, k] x [n, k], rotating over copies that together exceed the caches, median of `reps`
    rounds of one pass over the copies; and its bytes per call. None without torch."""
    try:
        import torch
    except ImportError:
        return None
    import statistics
    import time

    nbytes = n * k // 2 + (k // g) * n * 2 * 2
    copies = copies_for(nbytes)
    gen = torch.Generator().manual_seed(0)
    ws = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(
              torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen), 1),
           torch.randn(k // g, n, 2, dtype=torch.bfloat16, generator=gen) * 0.01)
          for _ in range(copies)]
    x = torch.randn(m, k, dtype=torch.bfloat16, generator=gen)
    op = torch.ops.aten._weight_int4pack_mm_for_cpu
    for w, sz in ws[:2]:
        op(x, w, g, sz)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for w, sz in ws:
            op(x, w, g, sz)
        times.append((time.perf_counter() - t0) / copies)
    return statistics.median(times), nbytes + 2 * (m * k + m * n)


def command() -> str:
    return "python scripts/kernel_bench.py " + " ".join(sys.argv[1:])


# --- bench ---------------------------------------------------------------------------------

def bench(args, ap):
    """Time the reference path (`implementation="xla"`: dequantize, then a dense GEMM), the
    Pallas kernel (as configured, and at the same block sizes unless --no-pallas-variants: the
    select tree with and without split K, gather without post-scaling, and the "pair" lookup,
    whose pair tables, 1 KB per row, are prepared once per weight copy and counted in its
    bytes), the CUDA kernel when built (the default kernel, and unless --no-cuda-variants each
    of the library's kernels: scaled, unit_pair, unit_lane), and a dense `x @ W.T`, per shape
    and M (median time); achieved bytes/s of each quantized path (its own layout's codes +
    scales + zeros + table, plus activations and output) against the device's copy bandwidth
    measured here. Each implementation gets its weight layout prepared once, outside the timed
    call (as QuantDense does). Writes kernels_<device>.json after every row and prints a
    markdown table. On a CPU it times the reference, the CPU kernel and a float32 dense GEMM
    (--dtype); the GPU kernels decline there."""
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
               "command": command()}
        path.write_text(json.dumps(rec, indent=2))

    runs = [(impl, impl, None) for impl in IMPLS]  # (column, implementation, variant)
    if not args.no_cuda_variants:
        runs[3:3] = [(col, "cuda", v) for col, v in CUDA_VARIANTS.items()]
    if not args.no_pallas_variants:
        runs[2:2] = [(col, "pallas", v) for col, v in PALLAS_VARIANTS.items()]
    for name, n, k in shapes(ap, args.shapes):
        qws, w = qweights(n, k, args.format, args.group_size, dtype=dt)
        qbytes = qws[0].nbytes()
        dense = [w + 0 for _ in range(copies_for(n * k * dt.itemsize))]
        # each implementation reads its own layout, prepared once (as QuantDense does)
        prepared = {impl: [prepare(q, impl) for q in qws] for impl in IMPLS
                    if not can_use(impl, jnp.zeros((1, k), dt), qws[0])}
        pairs = None  # the pair lookup's weight copies with their tables, made on first use
        for m in (int(s) for s in args.ms.split(",")):
            x = activations(m, k, dt)
            act = (x.size + m * n) * dt.itemsize
            row = {"shape": name, "n": n, "k": k, "m": m, "bytes": qbytes + act,
                   "dense_bytes": n * k * dt.itemsize + act}
            row["dense_s"] = time_per_call(lambda x, w: x @ w.T, x, dense, reps=args.reps)
            row["dense_bw_fraction"] = row["dense_bytes"] / row["dense_s"] / bw
            if row["dense_bw_fraction"] > 1.05:  # faster than memory allows: a broken timing
                print(f"warning: {name} M={m}: dense timing implies "
                      f"{100 * row['dense_bw_fraction']:.0f}% of copy bandwidth; not trusted",
                      file=sys.stderr)
            if dev.platform == "cpu" and (ti := torch_int4_seconds(n, k, args.group_size, m,
                                                                  args.reps)):
                row["torch_int4_s"], row["torch_int4_bytes"] = ti
                row["torch_int4_bw_fraction"] = ti[1] / ti[0] / bw
            for col, impl, variant in runs:
                reasons = can_use(impl, x, qws[0])
                if reasons or impl not in prepared:
                    row[f"{col}_s"] = None
                    row[f"{col}_declined"] = reasons or ["declined at M=1"]
                    continue
                ws = prepared[impl]
                io = ws[0].nbytes() + act
                call = lambda x, q, impl=impl: lut_matmul(x, q, implementation=impl)
                if impl == "cuda" and variant:
                    call = lambda x, q, kernel=variant: lut_matmul_cuda(x, q, kernel=kernel)
                elif variant:  # a Pallas variant: weight copies with their pair tables or None
                    cfg = tuning.block_config(m=m, n=n, k=k, g=args.group_size)
                    cfg = cfg.replace(**variant)
                    row[f"{col}_config"] = cfg.to_dict()
                    call = lambda x, qp, cfg=cfg: lut_matmul_pallas(x, qp[0], config=cfg,
                                                                    pairs=qp[1])
                    ws = [(q, None) for q in ws]
                try:
                    if isinstance(variant, dict) and variant.get("lookup") == "pair":
                        pairs = pairs or [(q, pair_table(q.lut)) for q, _ in ws]
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
    print_bench_table(rows, [col for col, _, _ in runs] + ["torch_int4"], dt)
    print(f"wrote {path}", file=sys.stderr)


def print_bench_table(rows: list[dict], cols: list[str], dt) -> None:
    """Markdown: times in us of every column that ran, each quantized path's speed-up over
    dense and its fraction of the copy bandwidth."""
    us = lambda t: "-" if t is None else f"{t * 1e6:.1f}"
    ran = [c for c in cols if any(r.get(f"{c}_s") is not None for r in rows)]
    fast = [c for c in ran if c != "xla"]
    head = (["shape (N x K)", "M", f"dense {dt.name} (us)"] + [f"{NAMES[c]} (us)" for c in ran]
            + [f"{NAMES[c]} vs dense" for c in fast]
            + [f"{NAMES[c]} % of copy BW" for c in fast])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        t = {c: r.get(f"{c}_s") for c in ran}
        bw = {c: r.get(f"{c}_bw_fraction") for c in fast}
        cells = ([f"{r['shape']} ({r['n']}x{r['k']})", str(r["m"]), us(r["dense_s"])]
                 + [us(t[c]) for c in ran]
                 + ["-" if t[c] is None else f"{r['dense_s'] / t[c]:.2f}x" for c in fast]
                 + ["-" if bw[c] is None else f"{100 * bw[c]:.0f}%" for c in fast])
        print("| " + " | ".join(cells) + " |")


# --- tune ----------------------------------------------------------------------------------

def crossover(time_kernel, time_reference, k) -> int:
    """The largest M in CROSSOVER_MS up to which the kernel beats the reference (the last M
    before the reference first wins)."""
    last = 16
    for m in CROSSOVER_MS:
        x = activations(m, k)
        if time_reference(x) < time_kernel(x):
            return last
        last = m
    return last


def tune(args, ap):
    """For each shape and M bucket (M=1..16 use the 16 bucket; buckets not tuned fall back to
    the rule in kernels/tuning.py), a coordinate descent from the table's configuration (or
    the rule of thumb), one axis at a time: the lookup variant (select tree, gather, gather +
    post-scale: pallas_gpu.py), split K, bn, bk, then warps and stages; keeps the fastest and
    records each variant's time at the starting block sizes. Then the crossovers:
    `dense_threshold`, the largest M in {32, 64, 128, 256} below which the Pallas kernel
    (rule-of-thumb block sizes, the chosen lookup variant) still beats the reference path
    (dequantize, then dense GEMM), and, when the CUDA kernel is built, `cuda_dense_threshold`,
    the same for the CUDA kernel (what `implementation=None` uses). Every Triton compile costs
    about a second, so the search stops at --budget-s seconds and keeps what it has (a GPU
    command may run 10 minutes). Prints the entries as JSON; --write merges them into the
    tuning table (with the GPU name, jax version and this command), which `kernels.tuning`
    reads."""
    if jax.default_backend() != "gpu" and not args.smoke:
        sys.exit("kernel_bench.py tune needs a GPU: the timings are the point (--smoke tests "
                 "the search anywhere)")
    if (args.smoke and args.write
            and Path(args.table).resolve() == Path(tuning.TABLE_PATH).resolve()):
        sys.exit("--smoke --write would put meaningless figures into the package's table: "
                 "give --table PATH")

    def timer(fn, x, ws, warmup=2):  # --smoke: one untimed run in Pallas' interpreter
        if args.smoke:
            return time_once(fn, x, ws)
        return time_per_call(fn, x, ws, reps=args.reps, warmup=warmup)

    def pallas(x, qws, cfg):
        return timer(lambda x, q: lut_matmul_pallas(x, q, config=cfg, interpret=args.smoke),
                     x, qws, warmup=1)

    def cuda(x, q):
        return lut_matmul(x, q, implementation="cuda")

    def timed(cfg, x, qws):  # None: a configuration Triton cannot compile
        try:
            return pallas(x, qws, cfg)
        except Exception as e:  # noqa: BLE001 - a config Triton cannot compile
            print(f"  {cfg}: {type(e).__name__}", file=sys.stderr)
            return None

    g = args.group_size
    entries = {}
    t_start = time.perf_counter()
    over = lambda: time.perf_counter() - t_start > args.budget_s
    for name, n, k in shapes(ap, args.shapes):
        if over():
            print(f"budget of {args.budget_s:.0f} s spent: stopping before {name}",
                  file=sys.stderr)
            break
        qws = qweights(n, k, args.format, g, 1 if args.smoke else None)[0]
        ref_t = lambda x, qws=qws: timer(lut_matmul_reference, x, qws)
        valid = lambda cfg, n=n, k=k: not cfg.problems(n=n, k=k, g=g)
        variant = {}  # the rule of thumb's lookup until a bucket picks one
        for m in (int(b) for b in args.buckets.split(",")):
            x = activations(m, k)
            best_cfg, best_t, variant_t = descend(
                tuning.block_config(m=m, n=n, k=k, g=g), AXES,
                lambda cfg, x=x, qws=qws: timed(cfg, x, qws), valid, over)
            if best_t is None:
                continue
            variant = {"lookup": best_cfg.lookup, "post_scale": best_cfg.post_scale}
            ref = ref_t(x)
            entries[f"{n}x{k}:g{g}:m{tuning.m_bucket(m)}"] = {
                **best_cfg.to_dict(), "us": best_t * 1e6, "reference_us": ref * 1e6,
                "variants_us": {v: None if t is None else t * 1e6 for v, t in variant_t.items()}}
            print(f"{name} M={m}: {best_t * 1e6:.1f} us {best_cfg} (reference "
                  f"{ref * 1e6:.1f} us)", file=sys.stderr)
        if not over():
            # at the rule-of-thumb block sizes, with the lookup variant the last bucket chose
            def pallas_t(x, n=n, k=k, qws=qws, variant=variant):
                rule = tuning.default_config(m=x.shape[0], n=n, k=k, g=g)
                return pallas(x, qws, rule.replace(**variant))

            entries[f"{n}x{k}:dense_threshold"] = crossover(pallas_t, ref_t, k)
        if not over() and not can_use("cuda", jnp.zeros((1, k), jnp.bfloat16), qws[0]):
            cws = [prepare(q, "cuda") for q in qws]
            entries[f"{n}x{k}:cuda_dense_threshold"] = crossover(
                lambda x, cws=cws: timer(cuda, x, cws, warmup=1), ref_t, k)
        print(f"{name}: " + json.dumps({e: v for e, v in entries.items()
                                        if e.startswith(f"{n}x{k}:") and "threshold" in e}),
              file=sys.stderr)
    rec = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "command": command(), "entries": entries}
    print(json.dumps(rec, indent=2))
    if args.write:
        old = json.loads(Path(args.table).read_text()) if os.path.isfile(args.table) else {}
        rec["entries"] = {**old.get("entries", {}), **entries}
        tmp = Path(f"{args.table}.tmp")  # written whole, then renamed: never half a table
        tmp.write_text(json.dumps(rec, indent=2))
        os.replace(tmp, args.table)
        print(f"wrote {args.table}", file=sys.stderr)


# --- profile -------------------------------------------------------------------------------

def profile(args, ap):
    """One call of each kernel per shape and M, for Nsight Compute:

        ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
            --section Occupancy --section WarpStateStats \\
            python3 scripts/kernel_bench.py profile

    Everything is compiled and run twice first; only the calls between cudaProfilerStart and
    cudaProfilerStop (one per implementation, shape and M) are profiled, so ncu's report holds
    the kernels of interest: the CUDA LUT GEMM (`lut_gemm_kernel`), the Pallas kernel (Triton)
    and XLA's dense bf16 product, each with its exact device time (`gpu__time_duration`) free
    of dispatch overhead, and the CUDA kernel's stall reasons. The weights are quantized with
    k-means from Student-t values. --impls (default $ANY4_PROFILE_IMPLS or cuda,pallas,dense)
    picks the implementations."""
    rng = np.random.default_rng(0)
    calls = []
    for name, n, k in shapes(ap, args.shapes):
        w = jnp.asarray(rng.standard_t(4, size=(n, k)) * 0.02, jnp.bfloat16)
        qw = quantize_weight(w, QuantConfig(format=args.format, group_size=args.group_size,
                                            sample_weighting="none"))
        for m in (int(s) for s in args.ms.split(",")):
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            for impl in args.impls.split(","):
                if impl == "dense":
                    f, wt = jax.jit(lambda x, w: x @ w.T), w
                else:
                    wt = prepare(qw, impl)
                    f = jax.jit(lambda x, q, impl=impl: lut_matmul(x, q, implementation=impl))
                calls.append((f"{impl} {name} M={m}", f, x, wt))
    for _ in range(2):
        for _, f, x, wt in calls:
            jax.block_until_ready(f(x, wt))
    with cuda_profiler_range():
        for label, f, x, wt in calls:
            print("profiling", label, file=sys.stderr)
            jax.block_until_ready(f(x, wt))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    modes = ap.add_subparsers(dest="mode", required=True)

    def mode(fn, summary, shapes_default, reps):
        p = modes.add_parser(fn.__name__, help=summary,
                             description=f"{summary}.\n\n{inspect.cleandoc(fn.__doc__)}",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(run=fn)
        p.add_argument("--shapes", default=shapes_default,
                       help="Llama matrices (any4_jax.shapes) or NxK, comma-separated")
        p.add_argument("--group-size", type=int, default=128)
        p.add_argument("--format", default="any4", choices=("any4", "int4"))
        if reps:
            p.add_argument("--reps", type=int, default=reps)
        return p

    p = mode(bench, "time every implementation against dense GEMM (GPU or CPU)",
             ",".join(LLAMA_SHAPES), 20)
    p.add_argument("--ms", default="1,4,16,64")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="activations and dense weights (default: bfloat16 on a GPU, float32 "
                        "on a CPU)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--no-pallas-variants", action="store_true",
                   help="time only the configured Pallas kernel, not its lookup variants")
    p.add_argument("--no-cuda-variants", action="store_true",
                   help="time only the default CUDA kernel, not each of the library's kernels")

    p = mode(tune, "tune the Pallas kernel's configuration per shape and M (GPU; --smoke: any)",
             ",".join(LLAMA_SHAPES), 10)
    p.add_argument("--buckets", default="16,64", help="M buckets to tune (16 covers M=1..16)")
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--write", action="store_true")
    p.add_argument("--table", default=tuning.TABLE_PATH,
                   help="the tuning table --write merges into")
    p.add_argument("--smoke", action="store_true",
                   help="test the search on any backend (Pallas' interpreter, one untimed run "
                        "per configuration; the figures mean nothing)")

    p = mode(profile, "one call of each kernel per shape and M, for Nsight Compute (GPU)",
             "llama3-8b/gate_up,llama3-8b/down,llama3-8b/o", None)
    p.add_argument("--ms", default="1,16")
    p.add_argument("--impls", default=os.environ.get("ANY4_PROFILE_IMPLS", "cuda,pallas,dense"))

    args = ap.parse_args()
    args.run(args, ap)


if __name__ == "__main__":
    main()
