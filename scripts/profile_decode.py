"""Where a decode token's time goes inside XLA: a profiler trace of `generate_ids`' device loop.

    python scripts/profile_decode.py [--model smollm2-135m] [--dtype float32]
                                     [--group-size 64] [--kernel cpu|dense] [--tokens 64]
                                     [--out benchmarks/results]

A model of the preset's shapes with random weights (as `bench_decode.py`): dense, or any4 g64
in every decoder layer through the CPU kernel. One generation of --tokens tokens (after one
that compiles) is traced with `jax.profiler` (its `*.trace.json.gz`); inside the execution of the
device loop (its second call: the steps after the first), the time per token of each kind of
XLA op (numbered suffixes merged: `ffi_call.17` counts as `ffi_call`; the executor's and the
loop's own events left out, so the rows do not nest) and, with the CPU kernel,
the median time of each kernel call of a layer, in call order (q/k/v, o, gate/up, down when a
layer makes 4). Tracing slows the step a little. Writes
`profile_decode_{model}_{dtype}_{kernel}.json` into --out and prints a table. Used for
docs/cpu_kernel_notes.md (v9).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

LAYER_CALLS = {4: ["q/k/v", "o", "gate/up", "down"],
               7: ["q", "k", "v", "o", "gate", "up", "down"]}


def loop_events(trace_dir: Path) -> tuple[dict, list[dict]]:
    """(the device loop's run of the later steps, the complete events inside it) of a perfetto
    trace."""
    files = sorted(trace_dir.glob("**/*.trace.json.gz"))
    if not files:
        raise SystemExit(f"no perfetto trace under {trace_dir}: jax.profiler wrote none")
    with gzip.open(files[-1]) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    runs = [e for e in events if e["name"].startswith("ThunkExecutor::Execute")]
    if not runs:
        raise SystemExit("the trace has no ThunkExecutor::Execute event (not the CPU backend?)")
    # the loop's second call (every step after the first): the run with the most runs inside
    # it (the loop body runs as a nested execution per step)
    end = lambda e: e["ts"] + e["dur"]
    within = lambda e, o: o is not e and o["ts"] <= e["ts"] and end(e) <= end(o)
    top = max(runs, key=lambda o: sum(within(e, o) for e in runs))
    t0, t1 = top["ts"], top["ts"] + top["dur"]
    inside = [e for e in events
              if e is not top and t0 <= e["ts"] and e["ts"] + e["dur"] <= t1]
    return top, inside


def main() -> int:
    from bench_decode import find_preset, quantize_randomly

    from any4_jax.models.llama.config import PRESETS
    from any4_jax.models.llama.generate import generate_ids
    from any4_jax.models.llama.params import random_model
    from any4_jax.nn import prepare_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--kernel", default="cpu", choices=("cpu", "dense"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if jax.default_backend() != "cpu":
        ap.error("this profiles the CPU backend's device loop; run it on a CPU machine")
    config = find_preset(args.model)
    if config is None:
        ap.error(f"--model {args.model}: choose one of {', '.join(PRESETS)}")
    if args.tokens < 4:
        ap.error("--tokens must be at least 4: the prefill's token and the first step are not "
                 "in the profiled call, and with one step left it cannot be told apart")
    model = random_model(config, param_dtype=jnp.dtype(args.dtype))
    if args.kernel == "cpu":
        quantize_randomly(model, "any4", args.group_size, lm_head=False)
        prepare_model(model, "cpu")
    prompt = list(range(1, 17))
    generate_ids(model, prompt, max_new_tokens=args.tokens, device_loop=True)  # compiles
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            out, _, _, seconds, _ = generate_ids(model, prompt, max_new_tokens=args.tokens,
                                                 device_loop=True)
        top, inside = loop_events(Path(tmp))
    n = len(out) - 2  # the tokens of the profiled loop
    per_kind = collections.defaultdict(lambda: [0, 0.0])
    for e in inside:
        if e["name"].startswith(("ThunkExecutor", "end: ", "while", "wrapped_while")):
            continue  # containers of the ops below, and zero-width markers
        kind = re.sub(r"\.\d+$", "", e["name"])
        per_kind[kind][0] += 1
        per_kind[kind][1] += e["dur"]
    kinds = sorted(({"op": k, "ms_per_token": t / n / 1e3, "per_token": c / n}
                    for k, (c, t) in per_kind.items()), key=lambda r: -r["ms_per_token"])
    calls = sorted((e for e in inside if re.fullmatch(r"ffi_call(\.\d+)?", e["name"])),
                   key=lambda e: e["ts"])
    per_layer = len(calls) // (n * config.num_layers) if calls else 0
    names = LAYER_CALLS.get(per_layer, [f"call {i}" for i in range(per_layer)])
    layer_calls = [{"call": names[i], "median_us": statistics.median(
        e["dur"] for e in calls[i::per_layer])} for i in range(per_layer)]
    rec = {"model": args.model, "dtype": args.dtype, "kernel": args.kernel,
           "group_size": args.group_size, "tokens_in_loop": n,
           "loop_ms_per_token": top["dur"] / n / 1e3, "traced_decode_s": seconds,
           "ops": kinds, "kernel_calls_per_layer": layer_calls,
           "command": "python scripts/profile_decode.py " + " ".join(sys.argv[1:])}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"profile_decode_{args.model}_{args.dtype}_{args.kernel}.json"
    path.write_text(json.dumps(rec, indent=2))
    print(f"| op ({args.model} {args.dtype}, {args.kernel}; loop {rec['loop_ms_per_token']:.2f} "
          "ms/token traced) | ms / token | per token |")
    print("|---|---|---|")
    for r in kinds[:20]:
        print(f"| {r['op']} | {r['ms_per_token']:.3f} | {r['per_token']:.1f} |")
    for c in layer_calls:
        print(f"kernel call {c['call']}: median {c['median_us']:.1f} us")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
