"""Time any4 quantization of Llama-sized matrices against per-row scikit-learn k-means.

    python scripts/bench_quantize.py [--shapes 4096x4096,14336x4096,4096x14336]
                                     [--sklearn-rows 256] [--out benchmarks/results]

Ours: `quantize_weight` (group scaling + k-means++ + Lloyd to convergence on all rows, then
encoding) on jax's default device; "cold" includes compilation, "warm" is the median of
`--repeats` further runs. Reference: the reference release's approach, scikit-learn
`KMeans(16, init="k-means++", n_init=1)` fitted per row on the same group-scaled values and
sample weights, the rows spread over all CPU cores with joblib. Fitting every row takes
minutes, so by default it times a random subset of `--sklearn-rows` rows and extrapolates
rows/s to the whole matrix (the JSON says which). The median per-row weighted SSE ratio of
ours over scikit-learn on that subset is reported as a quality check.
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


def _matrix(n, k, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4.0, size=(n, k)) * 0.02).astype(np.float32)
    xbar = np.exp(rng.standard_normal(k)).astype(np.float32)  # activation statistic
    return w, xbar


def _ours(w, xbar, cfg, repeats):
    from any4_jax import quantize_weight

    wj = jnp.asarray(w)
    jax.block_until_ready(wj)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        qw, info = quantize_weight(wj, cfg, sample_weight=xbar, return_info=True)
        jax.block_until_ready(qw.codes)
        times.append(time.perf_counter() - t0)
    return qw, info, times[0], statistics.median(times[1:])


def _scaled_rows(w, xbar, g, rows):
    """Group-scaled values and sample weights (activations x group scales), numpy float32."""
    sub = w[rows]
    wg = sub.reshape(len(rows), -1, g)
    mn, mx = wg.min(-1, keepdims=True), wg.max(-1, keepdims=True)
    alpha = np.maximum(mx - mn, 1e-6) / 15
    ws = ((wg - mn) / alpha).reshape(sub.shape)
    sw = (xbar[None, :] * np.repeat(alpha[..., 0], g, axis=1)).astype(np.float32)
    return ws, sw


def _fit_row(x, s):
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=16, init="k-means++", n_init=1, max_iter=300, tol=1e-4,
                random_state=0)
    return km.fit(x[:, None].astype(np.float64), sample_weight=s).cluster_centers_[:, 0]


def _sklearn(ws, sw, jobs):
    from joblib import Parallel, delayed

    Parallel(n_jobs=jobs)(delayed(_fit_row)(ws[i], sw[i]) for i in range(min(jobs, len(ws))))
    t0 = time.perf_counter()  # after a warm-up call: worker start-up is not counted
    cents = Parallel(n_jobs=jobs)(delayed(_fit_row)(ws[i], sw[i]) for i in range(len(ws)))
    return np.sort(np.asarray(cents, np.float32), 1), time.perf_counter() - t0


def _sse(x, s, c):
    mids = (c[:, :-1] + c[:, 1:]) / 2
    q = (x[:, :, None] > mids[:, None, :]).sum(-1)
    return (s * (x - np.take_along_axis(c, q, 1)) ** 2).sum(1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sklearn-rows", type=int, default=256,
                    help="rows fitted by the scikit-learn reference (0: skip it; -1: all)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--method", choices=("lloyd", "optimal"), default="lloyd",
                    help="KMeansConfig.method of the tables timed")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    from any4_jax import KMeansConfig, QuantConfig

    cfg = QuantConfig(format="any4", group_size=args.group_size,
                      kmeans=KMeansConfig(method=args.method))
    dev = jax.devices()[0]
    device = getattr(dev, "device_kind", dev.platform)
    results = []
    for i, name in enumerate(args.shapes.split(",")):
        n, k = (int(v) for v in name.split("x"))
        w, xbar = _matrix(n, k, seed=i)
        qw, info, cold, warm = _ours(w, xbar, cfg, args.repeats)
        row = {"shape": name, "ours_cold_s": cold, "ours_warm_s": warm,
               "ours_rows_per_s": n / warm, "kmeans_iters_mean": info.get("kmeans_iters_mean"),
               "kmeans_iters_max": info.get("kmeans_iters_max")}
        if args.sklearn_rows:
            m = n if args.sklearn_rows < 0 else min(n, args.sklearn_rows)
            rows = np.sort(np.random.default_rng(0).choice(n, m, replace=False))
            ws, sw = _scaled_rows(w, xbar, args.group_size, rows)
            ref_c, ref_t = _sklearn(ws, sw, args.jobs)
            ours_c = np.asarray(qw.lut, np.float32)[rows] + 8.0  # undo the table shift
            ratio = _sse(ws, sw, ours_c) / _sse(ws, sw, ref_c)
            ref_total = ref_t * n / m
            row.update(sklearn_rows_timed=m, sklearn_s_measured=ref_t,
                       sklearn_s_whole_matrix=ref_total, sklearn_rows_per_s=m / ref_t,
                       speedup_warm=ref_total / warm, speedup_cold=ref_total / cold,
                       sse_ratio_median=float(np.median(ratio)))
        results.append(row)
        print(json.dumps(row), flush=True)

    meta = {"device": device, "backend": jax.default_backend(), "jax": jax.__version__,
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "group_size": args.group_size, "sklearn_jobs": args.jobs, "method": args.method}
    print(f"\nany4 quantization, g{args.group_size}, k-means++ to convergence, on {device} "
          f"({jax.default_backend()}); scikit-learn on {args.jobs} CPU processes")
    print("| matrix | ours cold (s) | ours warm (s) | rows/s | sklearn per row (s, whole "
          "matrix) | speedup (warm) | SSE ours/sklearn |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        sk = r.get("sklearn_s_whole_matrix")
        print(f"| {r['shape']} | {r['ours_cold_s']:.2f} | {r['ours_warm_s']:.3f} | "
              f"{r['ours_rows_per_s']:.0f} | {sk:.1f} | {r['speedup_warm']:.0f}x | "
              f"{r['sse_ratio_median']:.3f} |" if sk else
              f"| {r['shape']} | {r['ours_cold_s']:.2f} | {r['ours_warm_s']:.3f} | "
              f"{r['ours_rows_per_s']:.0f} | - | - | - |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device.lower().replace(" ", "_")
    path = out / (f"quantize_{tag}.json" if args.method == "lloyd"
                  else f"quantize_{args.method}_{tag}.json")
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
