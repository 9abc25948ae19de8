"""Optimal vs Lloyd k-means tables: quantization time and per-row weighted SSE (issue 22).

    python scripts/bench_kmeans_optimal.py [--shapes 4096x4096,14336x4096,4096x14336]
        [--ppl NAME=results.json ...] [--out benchmarks/results/kmeans_optimal_cpu.json]

Times `quantize_weight` (any4, g128, the benchmark matrices of bench_quantize.py) with
KMeansConfig(method="lloyd") and method="optimal", warm, median of --repeats, and reports the
median and max over rows of SSE(optimal) / SSE(Lloyd) of the group-scaled values. --ppl adds
the perplexities of `any4 quantize --eval --json` runs to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _time(w, xbar, cfg, repeats):
    from any4_jax import quantize_weight

    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        qw = quantize_weight(w, cfg, sample_weight=xbar)
        jax.block_until_ready(qw.codes)
        times.append(time.perf_counter() - t0)
    return qw, statistics.median(times[1:])


def _sse(ws, sw, lut):
    from any4_jax.quant.kmeans import weighted_sse

    c = jnp.asarray(np.asarray(lut, np.float32)[:, :16] + 8.0)
    return np.asarray(weighted_sse(jnp.asarray(ws), jnp.asarray(sw), c), np.float64)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ppl", action="append", default=[], help="NAME=path of an --eval JSON")
    ap.add_argument("--timing-from", default=None,
                    help="reuse the results of an earlier run's JSON instead of timing again")
    ap.add_argument("--out", default="benchmarks/results/kmeans_optimal_cpu.json")
    args = ap.parse_args(argv)

    from bench_quantize import _matrix

    from any4_jax import KMeansConfig, QuantConfig
    from any4_jax.quant.quantize import _scale_rows

    lloyd = QuantConfig(format="any4", group_size=args.group_size,
                        kmeans=KMeansConfig(method="lloyd"))
    optimal = lloyd.replace(kmeans=KMeansConfig(method="optimal"))
    results = json.loads(Path(args.timing_from).read_text())["results"] if args.timing_from else []
    for i, name in enumerate([] if args.timing_from else args.shapes.split(",")):
        n, k = (int(v) for v in name.split("x"))
        w, xbar = _matrix(n, k, seed=i)
        wj = jnp.asarray(w)
        ql, tl = _time(wj, xbar, lloyd, args.repeats)
        qo, to = _time(wj, xbar, optimal, args.repeats)
        _, _, ws, sw = _scale_rows(wj, jnp.asarray(xbar), spec=lloyd.spec, g=args.group_size,
                                   symmetric=False, weighting=lloyd.sample_weighting)
        ratio = _sse(ws, sw, qo.lut) / _sse(ws, sw, ql.lut)
        row = {"shape": name, "lloyd_warm_s": tl, "optimal_warm_s": to, "time_ratio": to / tl,
               "sse_ratio_median": float(np.median(ratio)), "sse_ratio_max": float(ratio.max()),
               "sse_ratio_min": float(ratio.min()),
               "rows_optimal_better": float(np.mean(ratio < 1 - 1e-6))}
        results.append(row)
        print(json.dumps(row), flush=True)
    ppl = {}
    for item in args.ppl:
        key, path = item.split("=", 1)
        rec = json.loads(Path(path).read_text())
        ev, q = rec["eval"], rec["quantization"]
        ppl[key] = {"ppl": ev["ppl"], "text": ev["text"], "windows": ev["windows"],
                    "seq_len": ev["seq_len"], "format": q["format"],
                    "group_size": q["group_size"], "kmeans_method": q["kmeans"]["method"]}
    meta = {"backend": jax.default_backend(), "jax": jax.__version__,
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "group_size": args.group_size, "repeats": args.repeats}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "ppl": ppl},
                                         indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
