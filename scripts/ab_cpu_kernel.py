"""A/B of the CPU LUT GEMM: the source at a git revision against the working copy, one process.

    python scripts/ab_cpu_kernel.py [--old HEAD~1] [--ms 1,2,4,16] [--n 4096 --k 4096]
                                    [--group-size 128] [--rounds 5] [--json out.json]

The VM this runs on is noisy (the same timing moves 10-30% between runs), so versions are
compared only in one process: both sources are compiled (`native.build_cpu`, -march=native),
registered as two FFI targets and timed in turn, `--rounds` rounds of `time_per_call` each
(rotating over weight copies that together exceed the caches), medians compared. Float32 and
bf16 activations. Used for docs/cpu_kernel_notes.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax.kernels import cpu as cpu_kernel
from any4_jax.native.build_cpu import build_library
from any4_jax.quant.qweight import random_qweight
from any4_jax.timing import copies_for, time_per_call

SOURCE = "ffi_kernels/lut_gemm_cpu.cc"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="HEAD~1", help="git revision of the baseline source")
    ap.add_argument("--ms", default="1,2,4,16")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--weight-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="dtype of the tables, scales and zeros (a bf16 model's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    old_src = subprocess.run(["git", "show", f"{args.old}:{SOURCE}"], capture_output=True,
                             text=True, check=True).stdout
    tmp = Path(tempfile.mkdtemp()) / "lut_gemm_cpu_old.cc"
    tmp.write_text(old_src)
    # sources before v5 take float32 tables, scales and zeros: widened before their call, as
    # the Python wrapper of their time did
    old_wants_f32 = "ffi::AnyBuffer lut" not in old_src
    for name, src in (("old", str(tmp)), ("new", SOURCE)):
        lib = ctypes.cdll.LoadLibrary(build_library(f"lut_gemm_cpu_ab_{name}", src))
        jax.ffi.register_ffi_target(f"any4_ab_{name}", jax.ffi.pycapsule(lib.Any4LutGemmCpu),
                                    platform="cpu")
    n, k, g = args.n, args.k, args.group_size
    key = jax.random.key(0)
    make = lambda i: random_qweight(jax.random.fold_in(key, i), n, k, fmt="any4",
                                    group_size=g, dtype=jnp.dtype(args.weight_dtype))
    qws = [make(i) for i in range(copies_for(make(0).nbytes()))]
    rows = []
    for m in (int(s) for s in args.ms.split(",")):
        for dt in (jnp.float32, jnp.bfloat16):
            x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), dt)
            t = {"old": [], "new": []}
            for _ in range(args.rounds):
                for name in t:
                    f32 = name == "old" and old_wants_f32
                    widen = (lambda a: a.astype(jnp.float32)) if f32 else (lambda a: a)
                    fn = lambda x, q, name=name, widen=widen: cpu_kernel._call(
                        x, q.codes, widen(q.lut), widen(q.scales), widen(q.zeros),
                        group_size=g, target=f"any4_ab_{name}").astype(x.dtype)
                    t[name].append(time_per_call(fn, x, qws, reps=10))
            old, new = statistics.median(t["old"]), statistics.median(t["new"])
            row = {"m": m, "dtype": jnp.dtype(dt).name, "old_us": old * 1e6,
                   "new_us": new * 1e6, "speedup": old / new}
            rows.append(row)
            print(f"M={m} {row['dtype']}: old {row['old_us']:.0f} us, new {row['new_us']:.0f} "
                  f"us, {row['speedup']:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"old": args.old, "n": n, "k": k, "group_size": g,
                                               "weight_dtype": args.weight_dtype,
                                               "rounds": args.rounds, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
