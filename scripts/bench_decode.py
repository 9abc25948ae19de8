"""Batch-1 decode speed, bf16 vs 4-bit weights through each `lut_matmul` implementation.

    python scripts/bench_decode.py [--model llama3-8b] [--tokens 128] [--format any4]
                                   [--group-size 128] [--kernels dense,xla,pallas,cuda,cpu]
                                   [--cuda-kernel scaled|unit_pair|unit_lane]
                                   [--quantize-lm-head] [--out benchmarks/results]

A model of the preset's shapes with random weights (speed does not depend on the values; no
assets are needed on the GPU machine): first the dense bf16 model, then every decoder Dense
(and lm_head with --quantize-lm-head) replaced in place by a QuantDense holding random codes,
tables, scales and zeros of the format's shapes. Each kernel runs the greedy decode of
`generate_ids` (on the CPU its device-side loop; batch 1, the KV cache of the model issue)
after a short prompt, with the layers prepared once for it (`prepare_model`: the CUDA kernel
reads its own layout); tokens/s excludes the first, compiling, step and is the median of
--runs runs. The floor: bytes read per token (every weight but the embedding table, plus the
KV cache) over a bandwidth measured here: a copy's on a GPU, a read's
(`timing.read_bandwidth`) on the CPU. The CUDA kernel runs the library's default kernel
(`cuda_ffi.default_kernel()`), or the one --cuda-kernel names (one per process: a jitted decode
step keeps the kernel it was traced with). Writes JSON named after the device and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax.timing import copy_bandwidth, read_bandwidth


def random_qweight(key, n: int, k: int, fmt: str, g: int, dtype):
    from any4_jax.quant.qweight import random_qweight as make

    return make(key, n, k, fmt=fmt, group_size=g, dtype=dtype)


def quantize_randomly(model, fmt: str, g: int, *, lm_head: bool, seed: int = 0) -> int:
    """Replaces the decoder Dense layers (and lm_head) in place; returns how many."""
    from any4_jax.nn import QuantDense, get_layer, set_layer
    from any4_jax.ptq.quantize_model import DEFAULT_EXCLUDE, select_layers

    paths = select_layers(model, exclude=() if lm_head else DEFAULT_EXCLUDE)
    key = jax.random.key(seed)
    for i, path in enumerate(paths):
        layer = get_layer(model, path)
        n, k = layer.out_features, layer.in_features
        dtype = layer.kernel[...].dtype
        set_layer(model, path, QuantDense(random_qweight(jax.random.fold_in(key, i), n, k, fmt,
                                                         g, dtype)))
    return len(paths)


def find_preset(name: str):
    """The LlamaConfig preset called `name` (case, dashes and dots ignored), or None."""
    from any4_jax.models.llama.config import PRESETS

    norm = lambda s: s.lower().replace("-", "").replace(".", "")
    return next((c for key, c in PRESETS.items() if norm(key) == norm(name)), None)


def bytes_per_token(model, position: int) -> int:
    """Every array of the model except the embedding table (one row of it is read), plus the
    KV cache up to `position`."""
    from flax import nnx

    state = nnx.state(model)
    total = sum(a.nbytes for a in jax.tree.leaves(state))
    c = model.config
    emb = model.embed_tokens.embedding[...]
    if not c.tie_word_embeddings:  # a tied table is read whole by the output head
        total -= emb.nbytes - emb.nbytes // emb.shape[0]
    kv = 2 * c.num_layers * position * c.num_kv_heads * c.head_dim * emb.dtype.itemsize
    return total + kv


def main():
    from any4_jax.models.llama.config import PRESETS
    from any4_jax.models.llama.generate import decode_speed
    from any4_jax.models.llama.params import random_model
    from any4_jax.nn import prepare_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b",
                    help="a preset (case and dashes do not matter): " + ", ".join(PRESETS))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--format", default="any4", choices=("any4", "int4"))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--kernels", default=None,
                    help="default: dense,xla,pallas,cuda on a GPU, dense,xla,cpu on a CPU")
    ap.add_argument("--cuda-kernel", default=None,
                    help="the CUDA library's kernel (scaled, unit_pair, unit_lane; default: "
                         "$ANY4_JAX_CUDA_KERNEL or the library's default)")
    ap.add_argument("--quantize-lm-head", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    config = find_preset(args.model)
    if config is None:
        ap.error(f"--model {args.model}: choose one of {', '.join(PRESETS)}")
    kernels = (args.kernels or ("dense,xla,pallas,cuda" if jax.default_backend() == "gpu"
                                else "dense,xla,cpu")).split(",")
    unknown = set(kernels) - {"dense", "xla", "pallas", "cuda", "cpu"}
    if unknown:
        ap.error(f"--kernels: unknown {', '.join(sorted(unknown))}")
    from any4_jax.kernels.cuda_ffi import KERNELS, default_kernel

    if args.cuda_kernel is not None:
        if args.cuda_kernel not in KERNELS:
            ap.error(f"--cuda-kernel {args.cuda_kernel}: choose one of {', '.join(KERNELS)}")
        os.environ["ANY4_JAX_CUDA_KERNEL"] = args.cuda_kernel  # read when the step is traced
    cuda_kernel = default_kernel()

    dev = jax.devices()[0]
    # the floor's bandwidth: a copy on a GPU; on the CPU, where XLA's copy is far below the
    # memory's speed, a read (a decode step reads its weights)
    measure = "copy (read + write)" if dev.platform == "gpu" else "read (row sums)"
    bw = copy_bandwidth(2**30) if dev.platform == "gpu" else read_bandwidth(2**28)
    print(f"device: {dev.device_kind}; {measure} bandwidth {bw / 1e9:.0f} GB/s", file=sys.stderr)
    ks = {config.hidden_size, config.num_heads * config.head_dim, config.intermediate_size}
    bad = sorted(k for k in ks if k % args.group_size)
    if bad:
        ok = [g for g in (32, 64, 128, 256) if all(k % g == 0 for k in ks)]
        ap.error(f"--group-size {args.group_size} does not divide the input width(s) "
                 f"{', '.join(map(str, bad))} of {args.model}'s layers; use one of "
                 f"{', '.join(map(str, ok))}")
    model = random_model(config, param_dtype=jnp.dtype(args.dtype))
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, config.vocab_size,
                                                                args.prompt_len)]
    mid = args.prompt_len + args.tokens // 2
    rows = []
    n = 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "cpu" if dev.platform == "cpu" else dev.device_kind.lower().replace(" ", "_")
    suffix = f"_cuda_{args.cuda_kernel}" if args.cuda_kernel else ""
    path = Path(args.out) / f"decode_{args.model}_{name}{suffix}.json"

    def save():  # after every row: a run cut short by a time limit keeps what it measured
        rec = {"model": args.model, "device": dev.device_kind, "platform": dev.platform,
               "jax": jax.__version__, "dtype": args.dtype, "format": args.format,
               "group_size": args.group_size, "cuda_kernel": cuda_kernel,
               "quantized_layers": n,
               "lm_head_quantized": args.quantize_lm_head, "prompt_tokens": args.prompt_len,
               "new_tokens": args.tokens, "bandwidth_bytes_per_s": bw,
               "bandwidth_measure": measure, "rows": rows,
               "command": "python scripts/bench_decode.py " + " ".join(sys.argv[1:])}
        path.write_text(json.dumps(rec, indent=2))

    def record(kernel, tok_s, note=None):
        b = bytes_per_token(model, mid)
        floor = bw / b
        row = {"kernel": f"cuda ({cuda_kernel})" if kernel == "cuda" else kernel,
               "tokens_per_s": tok_s, "bytes_per_token": b,
               "floor_tokens_per_s": floor, "fraction_of_floor": tok_s / floor if tok_s else None}
        if note:
            row["declined"] = note
        rows.append(row)
        save()
        print(json.dumps(row), file=sys.stderr)

    if "dense" in kernels:
        record("dense", decode_speed(model, prompt, args.tokens, args.runs))
    n = quantize_randomly(model, args.format, args.group_size, lm_head=args.quantize_lm_head)
    print(f"{n} layers -> {args.format} g{args.group_size} (random contents)", file=sys.stderr)
    for kernel in (k for k in kernels if k != "dense"):
        try:
            prepare_model(model, kernel)
        except ValueError as e:
            record(kernel, None, str(e))
            continue
        try:
            record(kernel, decode_speed(model, prompt, args.tokens, args.runs))
        except Exception as e:  # noqa: BLE001 - one failing kernel must not cost the others
            record(kernel, None, f"failed: {type(e).__name__}: {str(e)[:500]}")

    dense = next((r["tokens_per_s"] for r in rows if r["kernel"] == "dense"), None)
    print(f"| model | device | weights | kernel | GB read / token | tokens/s | floor tokens/s "
          f"| % of floor | vs {args.dtype} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["tokens_per_s"]
        w = args.dtype if r["kernel"] == "dense" else f"{args.format} g{args.group_size}"
        cells = ["-", "-", "-"] if t is None else [
            f"{t:.1f}", f"{100 * r['fraction_of_floor']:.0f}%",
            "-" if not dense else f"{t / dense:.2f}x"]
        print(f"| {args.model} | {dev.device_kind} | {w} | {r['kernel']} | "
              f"{r['bytes_per_token'] / 1e9:.2f} | {cells[0]} | {r['floor_tokens_per_s']:.0f} | "
              f"{cells[1]} | {cells[2]} |")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
