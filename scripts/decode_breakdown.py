"""Where a batch-1 decode step's time goes on the CPU: the step with and without our GEMVs.

    python scripts/decode_breakdown.py [--model smollm2-135m] [--dtype float32]
                                       [--group-size 64] [--rounds 5] [--steps 20]
                                       [--out benchmarks/results]

A model of the preset's shapes with random weights (as `bench_decode.py`), its jitted decode
step (`generate_ids`'s) timed blocking (dispatch to token ready, median of --steps, rounds
interleaved): the dense model; every decoder Dense as any4 through the CPU kernel; the same
with the kernel replaced by a zero output of its shape (everything but the GEMVs: attention,
norms, the output head, dispatch); and the output head alone (dense in the model's dtype, in
bf16, and as any4 through the kernel) over rotated copies. Also the host's dispatch time (the
call's return, before the token is ready). The difference of the first two any4 rows is the
GEMVs' share of the step. Writes `decode_breakdown_{model}_{dtype}_cpu.json` into --out and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def step_call(model):
    """A call of `model`'s jitted decode step (`generate_ids`'s, retraced: the kernel may have
    changed) on a fresh cache, compiled and settled; it returns the token, not waited for."""
    from flax import nnx

    from any4_jax.models.llama import generate

    leaves, treedef = jax.tree.flatten(nnx.state(model))
    generate.clear_compiled()
    _, decode = generate._steps(nnx.graphdef(model), treedef)
    tok, key = jnp.zeros((1,), jnp.int32), jax.random.key(0)
    pos = np.int32(20)  # a numpy scalar, as generate_ids passes it (jnp.int32: ~35 us a call)
    box = {"cache": model.init_cache(1, 128)}

    def call():
        out, box["cache"] = decode(leaves, tok, box["cache"], pos, 0.0, 1.0, key)
        return out

    for _ in range(3):  # compile, settle
        call().block_until_ready()
    return call


def time_step(call, steps: int) -> tuple[float, float]:
    """(blocking step ms, dispatch ms) of `call`: medians over `steps` calls."""
    total, dispatch = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = call()
        t1 = time.perf_counter()
        out.block_until_ready()
        total.append(time.perf_counter() - t0)
        dispatch.append(t1 - t0)
    return 1e3 * statistics.median(total), 1e3 * statistics.median(dispatch)


def main() -> int:
    from bench_decode import find_preset, quantize_randomly

    from any4_jax.kernels import cpu as cpu_kernel
    from any4_jax.models.llama.config import PRESETS
    from any4_jax.models.llama.params import random_model
    from any4_jax.nn import prepare_model
    from any4_jax.quant.qweight import random_qweight
    from any4_jax.timing import time_per_call

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results", help="a directory")
    args = ap.parse_args()
    if jax.default_backend() != "cpu":
        ap.error("this breaks down the CPU decode step; run it on a CPU backend")
    config = find_preset(args.model)
    if config is None:
        ap.error(f"--model {args.model}: choose one of {', '.join(PRESETS)}")
    dtype, key = jnp.dtype(args.dtype), jax.random.key(0)
    model = random_model(config, param_dtype=dtype)

    calls = {"dense": step_call(model)}
    quantize_randomly(model, "any4", args.group_size, lm_head=False)
    prepare_model(model, "cpu")
    calls["any4 (CPU kernel)"] = step_call(model)
    real = cpu_kernel._call_many  # every kernel call goes through it
    # zeros that depend on x, so XLA cannot fold them into what follows
    cpu_kernel._call_many = lambda x2, weights, **kw: [
        jnp.zeros((x2.shape[0], w[0].shape[0]), jnp.float32) + 0 * x2[:, :1].astype(jnp.float32)
        for w in weights]
    try:
        calls["any4, GEMVs replaced by zeros"] = step_call(model)
    finally:
        cpu_kernel._call_many = real
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            times[name].append(time_step(call, args.steps))

    emb = model.embed_tokens.embedding[...]
    n, k = emb.shape
    heads = {f"head dense {dtype.name}": (dtype, [emb + i for i in range(3)])}
    if dtype != jnp.bfloat16:
        heads["head dense bfloat16"] = (jnp.bfloat16,
                                        [(emb + i).astype(jnp.bfloat16) for i in range(3)])
    head_ms = {}
    for name, (xdt, ws) in heads.items():
        x = jnp.ones((1, k), xdt)
        head_ms[name] = 1e3 * statistics.median(
            time_per_call(lambda x, w: x @ w.T, x, ws, reps=5) for _ in range(3))
    qs = [random_qweight(jax.random.fold_in(key, i), n, k, fmt="any4", group_size=args.group_size,
                         dtype=dtype) for i in range(3)]
    x = jnp.ones((1, k), dtype)
    head_ms["head any4 (CPU kernel)"] = 1e3 * statistics.median(
        time_per_call(lambda x, q: cpu_kernel._call(x, q.codes, q.lut, q.scales, q.zeros,
                                                    group_size=args.group_size), x, qs, reps=5)
        for _ in range(3))

    rows = [{"what": name, "step_ms": statistics.median(t for t, _ in v),
             "dispatch_ms": statistics.median(d for _, d in v)} for name, v in times.items()]
    rows += [{"what": name, "ms": ms} for name, ms in head_ms.items()]
    rec = {"model": args.model, "dtype": args.dtype, "group_size": args.group_size,
           "jax": jax.__version__, "rounds": args.rounds, "steps": args.steps, "rows": rows,
           "command": "python scripts/decode_breakdown.py " + " ".join(sys.argv[1:])}
    path = Path(args.out) / f"decode_breakdown_{args.model}_{args.dtype}_cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2))
    print(f"| {args.model} {args.dtype}, any4 g{args.group_size} | blocking step ms | "
          "of which dispatch ms |")
    print("|---|---|---|")
    for r in rows:
        if "step_ms" in r:
            print(f"| {r['what']} | {r['step_ms']:.2f} | {r['dispatch_ms']:.2f} |")
        else:
            print(f"| {r['what']} (alone) | {r['ms']:.2f} | - |")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
