"""Tune the Pallas kernel's block sizes per Llama shape and M bucket (run on a GPU).

    python scripts/tune_pallas.py [--group-size 128] [--shapes ...] [--buckets 16,64]
                                  [--budget-s 420] [--write]

For each shape and M bucket (M=1..16 use the 16 bucket; buckets not tuned fall back to the
rule in kernels/tuning.py), a coordinate descent with rotated weight copies
(kernel_timing.py) from the rule of thumb, one axis at a time: the lookup variant (select
tree, gather, gather + post-scale: pallas_gpu.py), split K, bn, bk, then warps and stages;
keeps the fastest and records each variant's time at the starting block sizes. Then the
crossovers: `dense_threshold`, the largest M in {32, 64, 128, 256} below which the Pallas
kernel (rule-of-thumb block sizes, the chosen lookup variant) still beats the reference path
(dequantize, then dense GEMM), and, when the CUDA kernel is built,
`cuda_dense_threshold`, the same for the CUDA kernel (what `implementation=None` uses).
Every Triton compile costs about a second, so the search stops at --budget-s seconds and keeps
what it has (a GPU command may run 10 minutes). `--write` merges the result into
any4_jax/kernels/tuning.json (with the GPU name, jax version and this command), which
`kernels.tuning` reads.
"""

from __future__ import annotations

import argparse
import functools
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

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import _qweights  # noqa: E402
from kernel_timing import copies_for, time_per_call  # noqa: E402

from any4_jax.kernels import pallas_gpu  # noqa: E402

CROSSOVER_MS = (32, 64, 128, 256)
# the lookup variants searched (select + post-scale is left out: no cheaper than select by
# instruction count, pallas_sass.py; the pair lookup too: it needs a pair table prepared per
# weight, which `lut_matmul`'s automatic path does not have; bench_kernels.py times it)
VARIANTS = {name: v for name, v in pallas_gpu.VARIANTS.items()
            if name not in ("select+post", "pair+post")}
# the axes of the search, in order; each value overrides part of the configuration
AXES = [("variant", list(VARIANTS.values())),
        ("split_k", [{"split_k": s} for s in (1, 2, 4, 8, 16)]),
        ("bn", [{"bn": b} for b in (32, 64, 128)]),
        ("bk", [{"bk": b} for b in (64, 128, 256)]),
        ("warps", [{"num_warps": w, "num_stages": st}
                   for w, st in itertools.product((4, 8), (2, 3, 4))])]


# --smoke: the search and the table's writing on any backend, the kernel in Pallas'
# interpreter, each configuration run once and timed by the host clock (meaningless numbers;
# a test of this script, so that a GPU session never loses its time to a broken one)
_SMOKE = False


def _time(fn, x, qws, *, reps, warmup=2):
    if not _SMOKE:
        return time_per_call(fn, x, qws, reps=reps, warmup=warmup)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x, qws[0]))
    return time.perf_counter() - t0


def _pallas(x, q, cfg):
    from any4_jax.kernels.pallas_gpu import lut_matmul_pallas

    return lut_matmul_pallas(x, q, config=cfg, interpret=_SMOKE)


def _cuda(x, q):
    from any4_jax.kernels import lut_matmul

    return lut_matmul(x, q, implementation="cuda")


def _timed(cfg, *, x, qws, reps):
    """Seconds per call of the Pallas kernel with `cfg`, None if Triton cannot compile it."""
    try:
        return _time(lambda x, q: _pallas(x, q, cfg), x, qws, reps=reps, warmup=1)
    except Exception as e:  # noqa: BLE001 - a config Triton cannot compile
        print(f"  {cfg}: {type(e).__name__}", file=sys.stderr)
        return None


def descend(start: dict, timed, valid, over) -> tuple[dict, float | None, dict]:
    """Coordinate descent over AXES from `start`: one axis at a time, every valid value of it
    with the others at their best so far. timed(cfg) -> seconds or None (failed); valid(cfg)
    -> bool; over() -> True once the time budget is spent (the variants are still timed).
    Returns the best config, its time and each lookup variant's time in us at the start's
    block sizes."""
    best_cfg, best_t = start, timed(start)
    tried = {json.dumps(start, sort_keys=True): best_t}
    variant_us = {}
    for axis, values in AXES:
        for value in values:
            if over() and axis != "variant":
                break
            cfg = {**best_cfg, **value}
            if not valid(cfg):
                continue
            key = json.dumps(cfg, sort_keys=True)
            if key not in tried:
                tried[key] = timed(cfg)
            t = tried[key]
            if axis == "variant":
                name = next(v for v, c in VARIANTS.items() if c == value)
                variant_us[name] = None if t is None else t * 1e6
            if t is not None and (best_t is None or t < best_t):
                best_t, best_cfg = t, cfg
    return best_cfg, best_t, variant_us


def _valid(cfg, *, m, n, k, g) -> bool:
    from any4_jax.kernels.pallas_gpu import _config

    try:  # a combination the kernel rejects (e.g. bk does not divide g)
        _config(cfg, m=m, n=n, k=k, g=g)
    except ValueError:
        return False
    return True


def _at_rule_sizes(x, *, qws, g, variant, reps):
    """Seconds per call of the Pallas kernel at the rule-of-thumb block sizes for x's M."""
    from any4_jax.kernels.tuning import default_config

    n, k = qws[0].shape
    cfg = {**default_config(m=x.shape[0], n=n, k=k, g=g), **variant}
    return _time(lambda x, q: _pallas(x, q, cfg), x, qws, reps=reps, warmup=1)


def crossover(time_kernel, time_reference, k) -> int:
    """The largest M in CROSSOVER_MS up to which the kernel beats the reference (the last M
    before the reference first wins)."""
    last = 16
    for m in CROSSOVER_MS:
        x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.bfloat16)
        if time_reference(x) < time_kernel(x):
            return last
        last = m
    return last


def main():
    from any4_jax.kernels.reference import lut_matmul_reference
    from any4_jax.kernels.tuning import _TABLE, block_config, m_bucket
    from any4_jax.shapes import LLAMA_SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--format", default="any4")
    ap.add_argument("--shapes", default=",".join(LLAMA_SHAPES))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--buckets", default="16,64", help="M buckets to tune (16 covers M=1..16)")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--table", default=_TABLE, help="the tuning table --write merges into")
    ap.add_argument("--smoke", action="store_true",
                    help="test this script on any backend (Pallas' interpreter, one untimed "
                         "run per configuration; the figures mean nothing)")
    args = ap.parse_args()
    global _SMOKE
    _SMOKE = args.smoke
    if jax.default_backend() != "gpu" and not args.smoke:
        sys.exit("tune_pallas.py needs a GPU: the timings are the point (--smoke tests the "
                 "script anywhere)")
    if args.smoke and args.write and Path(args.table).resolve() == Path(_TABLE).resolve():
        sys.exit("--smoke --write would put meaningless figures into the package's table: "
                 "give --table PATH")
    from any4_jax.kernels import can_use, prepare

    g = args.group_size
    entries = {}
    t_start = time.perf_counter()
    over = lambda: time.perf_counter() - t_start > args.budget_s
    for name in args.shapes.split(","):
        if over():
            print(f"budget of {args.budget_s:.0f} s spent: stopping before {name}",
                  file=sys.stderr)
            break
        if name in LLAMA_SHAPES:
            n, k = LLAMA_SHAPES[name]
        elif re.fullmatch(r"\d+x\d+", name):
            n, k = map(int, name.split("x"))  # N x K
        else:
            ap.error(f"--shapes: unknown {name!r}; give one of {', '.join(LLAMA_SHAPES)} or NxK")
        one, _ = _qweights(n, k, args.format, g, 1)
        qws, _ = _qweights(n, k, args.format, g,
                           1 if args.smoke else copies_for(one[0].nbytes()))
        ref_t = lambda x, qws=qws: _time(lut_matmul_reference, x, qws, reps=args.reps)
        variant = {}  # the rule of thumb's lookup until a bucket picks one
        for m in (int(b) for b in args.buckets.split(",")):
            x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.bfloat16)
            timed = functools.partial(_timed, x=x, qws=qws, reps=args.reps)
            valid = functools.partial(_valid, m=m, n=n, k=k, g=g)
            best_cfg, best_t, variant_us = descend(block_config(m=m, n=n, k=k, g=g), timed,
                                                   valid, over)
            if best_t is None:
                continue
            best = (best_t, best_cfg)
            variant = {key: best_cfg[key] for key in ("lookup", "post_scale")}
            ref = ref_t(x)
            entries[f"{n}x{k}:g{g}:m{m_bucket(m)}"] = {**best[1], "us": best[0] * 1e6,
                                                       "reference_us": ref * 1e6,
                                                       "variants_us": variant_us}
            print(f"{name} M={m}: {best[0] * 1e6:.1f} us {best[1]} (reference "
                  f"{ref * 1e6:.1f} us)", file=sys.stderr)
        if not over():
            # at the rule-of-thumb block sizes, with the lookup variant the last bucket chose
            pallas_t = functools.partial(_at_rule_sizes, qws=qws, g=g, variant=variant,
                                         reps=args.reps)
            entries[f"{n}x{k}:dense_threshold"] = crossover(pallas_t, ref_t, k)
        if not over() and not can_use("cuda", jnp.zeros((1, k), jnp.bfloat16), qws[0]):
            cws = [prepare(q, "cuda") for q in qws]
            entries[f"{n}x{k}:cuda_dense_threshold"] = crossover(
                lambda x, cws=cws: _time(_cuda, x, cws, reps=args.reps, warmup=1), ref_t, k)
        print(f"{name}: " + json.dumps({e: v for e, v in entries.items()
                                        if e.startswith(f"{n}x{k}:") and "threshold" in e}),
              file=sys.stderr)
    rec = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "command": "python scripts/tune_pallas.py " + " ".join(sys.argv[1:]),
           "entries": entries}
    print(json.dumps(rec, indent=2))
    if args.write:
        old = json.loads(Path(args.table).read_text()) if os.path.isfile(args.table) else {}
        old_entries = old.get("entries", {})
        old_entries.update(entries)
        rec["entries"] = old_entries
        tmp = Path(f"{args.table}.tmp")  # written whole, then renamed: never half a table
        tmp.write_text(json.dumps(rec, indent=2))
        os.replace(tmp, args.table)
        print(f"wrote {args.table}", file=sys.stderr)


if __name__ == "__main__":
    main()
