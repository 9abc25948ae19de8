"""Whole-model any4 quantization time, calibration included.

    python scripts/bench_model_quant.py [--model smollm2|llama3-8b] [--group-size 64]

smollm2: the embedded SmolLM2-135M (real weights, float32 on CPU), sequential calibration on
the built-in prompt, exactly what `any4 quantize` does (model loading excluded here, reported
separately). llama3-8b: a randomly initialised model of Llama-3-8B's shapes in bfloat16 (GPU:
the goal is under 60 s on an H100), calibrated on 156 random token ids (no assets needed on
the GPU machine). Writes JSON to benchmarks/results/ and prints one table row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("smollm2", "llama3-8b"), default="smollm2")
    ap.add_argument("--group-size", type=int, default=None,
                    help="default: 64 for smollm2, 128 for llama3-8b")
    ap.add_argument("--format", default="any4")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    from any4_jax.loading import load_model
    from any4_jax.ptq import CalibrationConfig, calibration_tokens, quantize_model
    from any4_jax.quant import QuantConfig

    t0 = time.perf_counter()
    if args.model == "smollm2":
        lm = load_model()
        tokens = calibration_tokens(lm.tokenizer.encode, CalibrationConfig())
        model, g = lm.model, args.group_size or 64
    else:
        import numpy as np

        from any4_jax.models.llama.config import LLAMA3_8B
        from any4_jax.models.llama.params import random_model

        model = random_model(LLAMA3_8B, param_dtype=jnp.bfloat16)
        # random weights: random token ids (the prompt's length) are as good as text
        tokens = np.random.default_rng(0).integers(0, LLAMA3_8B.vocab_size, (1, 156))
        g = args.group_size or 128
    jax.block_until_ready(jax.tree.leaves(jax.tree.map(lambda a: a, model.embed_tokens)))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    qm, rep = quantize_model(model, QuantConfig(format=args.format, group_size=g),
                             tokens=tokens, in_place=True)
    total = time.perf_counter() - t0
    dev = jax.devices()[0]
    rec = {"model": args.model, "format": args.format, "group_size": g,
           "device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
           "layers": len(rep.layers), "load_or_init_seconds": load_s,
           "calibration_seconds": rep.calibration_seconds,
           "quantize_seconds": rep.quantize_seconds, "total_seconds": total,
           "command": "python scripts/bench_model_quant.py " + " ".join(sys.argv[1:])}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "cpu" if dev.platform == "cpu" else dev.device_kind.lower().replace(" ", "_")
    path = Path(args.out) / f"model_quant_{args.model}_{name}.json"
    path.write_text(json.dumps(rec, indent=2))
    print("| model | device | format | layers | calibration s | quantize s | total s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.model} | {dev.device_kind} | {args.format} g{g} | {len(rep.layers)} | "
          f"{rep.calibration_seconds:.1f} | {rep.quantize_seconds:.1f} | {total:.1f} |")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
