"""Tune the Pallas kernel's block sizes per Llama shape and M bucket (run on a GPU).

    python scripts/tune_pallas.py [--group-size 128] [--shapes ...] [--write]

For each shape and M in the buckets {16, 32, 64, 128, 256} (M=1 uses the 16 bucket), times every
candidate (bn, bk, num_warps, num_stages) with rotated weight copies (kernel_timing.py), keeps
the fastest, and records `dense_threshold`: the smallest M at which the reference path
(dequantize, then dense GEMM) beats the best kernel config. `--write` stores the result in
any4_jax/kernels/tuning.json (with the GPU name, jax version and this command), which
`kernels.tuning.block_config` reads.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import _qweights  # noqa: E402
from kernel_timing import copies_for, time_per_call  # noqa: E402

BUCKETS = (16, 32, 64, 128, 256)


def main():
    from any4_jax.kernels.pallas_gpu import lut_matmul_pallas
    from any4_jax.kernels.reference import lut_matmul_reference
    from any4_jax.kernels.tuning import _TABLE, m_bucket
    from any4_jax.shapes import LLAMA_SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--format", default="any4")
    ap.add_argument("--shapes", default=",".join(LLAMA_SHAPES))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit("tune_pallas.py needs a GPU: the timings are the point")
    g = args.group_size
    entries = {}
    for name in args.shapes.split(","):
        n, k = LLAMA_SHAPES[name]
        one, _ = _qweights(n, k, args.format, g, 1)
        qws, _ = _qweights(n, k, args.format, g, copies_for(one[0].nbytes()))
        threshold = None
        for m in BUCKETS:
            x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.bfloat16)
            best = None
            for bn, bk, warps, stages in itertools.product(
                    (32, 64, 128), (64, 128, 256), (2, 4, 8), (2, 3, 4)):
                if n % bn or g % bk or bk > g:
                    continue
                cfg = {"bm": min(m, 64), "bn": bn, "bk": bk, "num_warps": warps,
                       "num_stages": stages}
                try:
                    t = time_per_call(lambda x, q, c=cfg: lut_matmul_pallas(x, q, config=c),
                                      x, qws, reps=args.reps, warmup=1)
                except Exception as e:  # noqa: BLE001 - a config Triton cannot compile
                    print(f"  {cfg}: {type(e).__name__}", file=sys.stderr)
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg)
            ref = time_per_call(lut_matmul_reference, x, qws, reps=args.reps)
            entries[f"{n}x{k}:g{g}:m{m_bucket(m)}"] = {**best[1], "us": best[0] * 1e6,
                                                       "reference_us": ref * 1e6}
            print(f"{name} M={m}: {best[0] * 1e6:.1f} us {best[1]} (reference "
                  f"{ref * 1e6:.1f} us)", file=sys.stderr)
            if threshold is None and ref < best[0]:
                threshold = m - 1
        entries[f"{n}x{k}:dense_threshold"] = threshold or BUCKETS[-1]
    rec = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "command": "python scripts/tune_pallas.py " + " ".join(sys.argv[1:]),
           "entries": entries}
    print(json.dumps(rec, indent=2))
    if args.write:
        old = json.loads(Path(_TABLE).read_text()) if os.path.isfile(_TABLE) else {}
        old_entries = old.get("entries", {})
        old_entries.update(entries)
        rec["entries"] = old_entries
        Path(_TABLE).write_text(json.dumps(rec, indent=2))
        print(f"wrote {_TABLE}", file=sys.stderr)


if __name__ == "__main__":
    main()
