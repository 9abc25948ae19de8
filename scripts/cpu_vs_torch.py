"""Our CPU kernel against torch's int4 CPU op, interleaved in one process (issue 24).

    python scripts/cpu_vs_torch.py [--shapes 4096x4096,llama3-8b/down] [--ms 1,2,4]
        [--group-size 128] [--rounds 7] [--out benchmarks/results/cpu_vs_torch_int4.json]

Per shape and M, each round times in turn: our kernel with bf16 activations and a bf16 model's
tables, scales and zeros (`lut_matmul(..., implementation="cpu")`, the jitted call as a layer
makes it), the same with float32 activations and weights, and torch's
`aten._weight_int4pack_mm_for_cpu` (int4 codes, bf16 activations, bf16 scales and zeros);
each over weight copies that together exceed the caches; medians over --rounds. This VM is
noisy (the same timing moves 10-50% between runs): only ratios within one run mean anything.
Bytes/s are against the read bandwidth measured here the same way as the issue did (torch's
2-thread sum over 256 MB) and numpy's copy.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax.kernels import lut_matmul
from any4_jax.quant.qweight import random_qweight
from any4_jax.shapes import LLAMA_SHAPES
from any4_jax.timing import copies_for, time_per_call


def resolve_shape(spec: str) -> tuple[str, int, int]:
    if spec in LLAMA_SHAPES:
        return (spec, *LLAMA_SHAPES[spec])
    n, k = map(int, spec.lower().split("x"))
    return spec, n, k


def read_bandwidth(torch) -> dict:
    a = torch.ones(2**26)  # 256 MB of float32
    t = []
    for _ in range(7):
        t0 = time.perf_counter()
        a.sum()
        t.append(time.perf_counter() - t0)
    b = np.ones(2**25, np.float32)  # 128 MB
    c = np.empty_like(b)
    tc = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(c, b)
        tc.append(time.perf_counter() - t0)
    return {"torch_sum_read_gbps": a.numel() * 4 / min(t) / 1e9,
            "numpy_copy_read_plus_write_gbps": 2 * b.nbytes / min(tc) / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x4096,llama3-8b/down")
    ap.add_argument("--ms", default="1,2,4")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/cpu_vs_torch_int4.json")
    a = ap.parse_args()
    import torch

    g = a.group_size
    bw = read_bandwidth(torch)
    print(f"read bandwidth: torch sum {bw['torch_sum_read_gbps']:.1f} GB/s; numpy copy "
          f"{bw['numpy_copy_read_plus_write_gbps']:.1f} GB/s (read + write)", flush=True)
    rows = []
    key = jax.random.key(0)
    for spec in a.shapes.split(","):
        name, n, k = resolve_shape(spec)
        ours = {}
        for dt in (jnp.bfloat16, jnp.float32):
            make = lambda i, dt=dt, n=n, k=k: random_qweight(jax.random.fold_in(key, i), n, k,
                                                   fmt="any4", group_size=g, dtype=dt)
            ours[jnp.dtype(dt).name] = [make(i) for i in range(copies_for(make(0).nbytes()))]
        tbytes = n * k // 2 + (k // g) * n * 2 * 2
        gen = torch.Generator().manual_seed(0)
        tws = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen), 1),
                torch.randn(k // g, n, 2, dtype=torch.bfloat16, generator=gen) * 0.01)
               for _ in range(copies_for(tbytes))]
        op = torch.ops.aten._weight_int4pack_mm_for_cpu
        for m in (int(s) for s in a.ms.split(",")):
            xs = {d: jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), d)
                  for d in ours}
            tx = torch.randn(m, k, dtype=torch.bfloat16, generator=gen)
            t = {"ours_bfloat16": [], "ours_float32": [], "torch_int4": []}
            fn = lambda x, q: lut_matmul(x, q, implementation="cpu")
            for _ in range(a.rounds):
                for d in ours:
                    t[f"ours_{d}"].append(time_per_call(fn, xs[d], ours[d], reps=5))
                for w, sz in tws[:2]:
                    op(tx, w, g, sz)
                t0 = time.perf_counter()
                for w, sz in tws:
                    op(tx, w, g, sz)
                t["torch_int4"].append((time.perf_counter() - t0) / len(tws))
            med = {c: statistics.median(v) for c, v in t.items()}
            row = {"shape": name, "n": n, "k": k, "m": m,
                   **{f"{c}_us": v * 1e6 for c, v in med.items()},
                   "bytes_ours_bfloat16": ours["bfloat16"][0].nbytes() + 2 * m * (k + n),
                   "bytes_torch_int4": tbytes + 2 * m * (k + n)}
            row["torch_over_ours_bfloat16"] = med["torch_int4"] / med["ours_bfloat16"]
            row["torch_over_ours_float32"] = med["torch_int4"] / med["ours_float32"]
            row["ours_bfloat16_gbps"] = row["bytes_ours_bfloat16"] / med["ours_bfloat16"] / 1e9
            row["torch_int4_gbps"] = row["bytes_torch_int4"] / med["torch_int4"] / 1e9
            rows.append(row)
            print(f"{name} M={m}: ours bf16 {row['ours_bfloat16_us']:.0f} us "
                  f"({row['ours_bfloat16_gbps']:.1f} GB/s), ours f32 "
                  f"{row['ours_float32_us']:.0f} us, torch int4 {row['torch_int4_us']:.0f} us "
                  f"({row['torch_int4_gbps']:.1f} GB/s); torch/ours bf16 "
                  f"{row['torch_over_ours_bfloat16']:.2f}x, f32 "
                  f"{row['torch_over_ours_float32']:.2f}x", flush=True)
    rec = {"command": "python scripts/cpu_vs_torch.py " + " ".join(sys.argv[1:]),
           "group_size": g, "rounds": a.rounds, "bandwidth": bw, "rows": rows,
           "torch": torch.__version__, "jax": jax.__version__,
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "torch_threads": torch.get_num_threads()}}
    from any4_jax import outputs

    outputs.write_json(a.out, rec)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
