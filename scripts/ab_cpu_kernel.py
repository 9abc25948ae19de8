"""A/B of the CPU LUT GEMM: the source at a git revision against the working copy, one process.

    python scripts/ab_cpu_kernel.py [--old HEAD~1] [--ms 1,2,4,16] [--n 4096 --k 4096]
                                    [--group-size 128] [--rounds 5] [--json out.json]
    python scripts/ab_cpu_kernel.py --decode smollm2-135m [--dtype float32] [--group-size 64]

The VM this runs on is noisy (the same timing moves 10-30% between runs), so versions are
compared only in one process: both sources are compiled (`native.build_cpu`, -march=native),
registered as two FFI targets and timed in turn, `--rounds` rounds of `time_per_call` each
(rotating over weight copies that together exceed the caches), medians compared. Float32 and
bf16 activations. With --decode MODEL: the blocking batch-1 decode step (the jitted step of
`generate_ids`, its wall time until the token is ready) and `generate_ids`'s tokens/s (as
users run it: on the CPU its device-side loop) of a model of that preset with random
any4 weights in every decoder layer, through each library in turn, --rounds rounds of
--steps steps. Used for docs/cpu_kernel_notes.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
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
    ap.add_argument("--decode", default=None, metavar="MODEL",
                    help="time the decode step of this preset instead (e.g. smollm2-135m)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="--decode: the model's dtype")
    ap.add_argument("--steps", type=int, default=20, help="--decode: steps per round")
    ap.add_argument("--old-separate", action="store_true",
                    help="--decode: the old build computes each projection in its own call "
                         "(always so for sources that take one weight per call)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    old_src = subprocess.run(["git", "show", f"{args.old}:{SOURCE}"], capture_output=True,
                             text=True, check=True).stdout
    tmp = Path(tempfile.mkdtemp()) / "lut_gemm_cpu_old.cc"
    tmp.write_text(old_src)
    for header in re.findall(r'^#include "([^"/]+)"', old_src, flags=re.M):  # its own headers
        (tmp.parent / header).write_text(subprocess.run(
            ["git", "show", f"{args.old}:ffi_kernels/{header}"], capture_output=True, text=True,
            check=True).stdout)
    # sources before v5 take float32 tables, scales and zeros: widened before their call, as
    # the Python wrapper of their time did
    old_wants_f32 = "ffi::AnyBuffer lut" not in old_src
    for name, src in (("old", str(tmp)), ("new", SOURCE)):
        lib = ctypes.cdll.LoadLibrary(build_library(f"lut_gemm_cpu_ab_{name}", src))
        jax.ffi.register_ffi_target(f"any4_ab_{name}", jax.ffi.pycapsule(lib.Any4LutGemmCpu),
                                    platform="cpu")
    # sources before v8d take one weight per call: the old model then calls each projection
    separate = args.old_separate or ".RemainingArgs()" not in old_src
    rows = decode_rows(args, separate) if args.decode else kernel_rows(args, old_wants_f32)
    if args.json:
        Path(args.json).write_text(json.dumps({"old": args.old, "n": args.n, "k": args.k,
                                               "group_size": args.group_size,
                                               "weight_dtype": args.weight_dtype,
                                               "decode": args.decode, "dtype": args.dtype,
                                               "rounds": args.rounds, "rows": rows}, indent=2))
    return 0


def decode_rows(args, old_separate: bool) -> list[dict]:
    """Median blocking decode-step time through each library, interleaved rounds;
    `old_separate`: the old one computes each projection in its own call (no shared calls)."""
    from bench_decode import find_preset, quantize_randomly
    from decode_breakdown import step_call, time_step

    from any4_jax.models.llama import generate, modules
    from any4_jax.models.llama.config import PRESETS
    from any4_jax.models.llama.params import random_model
    from any4_jax.nn import prepare_model

    config = find_preset(args.decode)
    if config is None:
        raise SystemExit(f"--decode {args.decode}: choose one of {', '.join(PRESETS)}")
    model = random_model(config, param_dtype=jnp.dtype(args.dtype))
    quantize_randomly(model, "any4", args.group_size, lm_head=False)
    prepare_model(model, "cpu")
    cpu_kernel._register()  # the library's own target, before TARGET is pointed elsewhere

    shared = modules.project
    one_each = lambda layers, x: [layer(x) for layer in layers]

    def use(target: str) -> None:  # step_call and generate retrace: they see these
        cpu_kernel.TARGET = target
        modules.project = one_each if old_separate and target.endswith("old") else shared

    def step_ms(target: str) -> float:
        use(target)
        return time_step(step_call(model), args.steps)[0]

    def tokens_per_s(target: str) -> float:  # generate_ids as users run it (device loop)
        use(target)
        generate.clear_compiled()
        out, _, _, seconds, _ = generate.generate_ids(model, list(range(1, 17)),
                                                      max_new_tokens=args.steps + 2)
        return (len(out) - 2) / seconds

    t = {"old": [], "new": []}
    speed = {"old": [], "new": []}
    try:
        for _ in range(args.rounds):
            for name in t:
                t[name].append(step_ms(f"any4_ab_{name}"))
                speed[name].append(tokens_per_s(f"any4_ab_{name}"))
    finally:
        modules.project = shared
    old, new = statistics.median(t["old"]), statistics.median(t["new"])
    old_tok, new_tok = statistics.median(speed["old"]), statistics.median(speed["new"])
    print(f"decode step {args.decode} {args.dtype} g{args.group_size}: old {old:.2f} ms, new "
          f"{new:.2f} ms, {old / new:.2f}x; generate_ids: old {old_tok:.1f} tokens/s, new "
          f"{new_tok:.1f}, {new_tok / old_tok:.2f}x", flush=True)
    return [{"old_separate_calls": old_separate, "decode_step_old_ms": old,
             "decode_step_new_ms": new, "speedup": old / new,
             "tokens_per_s_old": old_tok, "tokens_per_s_new": new_tok,
             "rounds_old_ms": t["old"], "rounds_new_ms": t["new"],
             "rounds_old_tokens_per_s": speed["old"], "rounds_new_tokens_per_s": speed["new"]}]


def kernel_rows(args, old_wants_f32: bool) -> list[dict]:
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
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
