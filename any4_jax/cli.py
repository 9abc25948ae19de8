"""The `any4` command. Subcommands compose the library; they hold no numerics of their own."""

from __future__ import annotations

import argparse
import json
import sys
import time

from any4_jax.cli_model import add_model_commands, cli_errors
from any4_jax.cli_quant import add_quant_commands, fix_defaults
from any4_jax.quant.formats import FORMAT_NAMES


def _formats(text: str) -> list[str]:
    from any4_jax.quant.formats import parse_format

    names = [t for t in (s.strip() for s in text.split(",")) if t]
    for n in names:
        try:
            parse_format(n)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
    return names


def _group_size(text: str) -> int | None:
    if text.lower() in ("row", "none"):
        return None
    try:
        g = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--group-size {text!r}: an integer or 'row'") from e
    if g < 1:
        raise argparse.ArgumentTypeError(f"--group-size {g}: must be positive")
    return g


def _add_quantize_matrix(sub):
    p = sub.add_parser(
        "quantize-matrix",
        help="quantize a random weight matrix with several formats and compare their errors",
        description="Quantizes one random [rows, cols] matrix with each format and prints the "
        "weight error, the output error on random activations, bits per weight and the time.",
    )
    p.add_argument("--rows", type=int, default=2048, help="N = out_features (default 2048)")
    p.add_argument("--cols", type=int, default=2048, help="K = in_features (default 2048)")
    p.add_argument("--formats", type=_formats, default=_formats("int4,fp4,nf4,any4"),
                   help=f"comma-separated, from {', '.join(FORMAT_NAMES)}")
    p.add_argument("--group-size", type=_group_size, default=128,
                   help="elements per group along K, or 'row' (default 128)")
    p.add_argument("--dist", choices=("normal", "student-t"), default="student-t",
                   help="weight distribution; student-t (3 dof) has LLM-like outliers")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    p.set_defaults(func=_run_quantize_matrix)


def _run_quantize_matrix(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from any4_jax.quant.config import QuantConfig
    from any4_jax.quant.quantize import quantize_weight

    # numpy draws: jax.random.t is slow on CPU for millions of samples
    rng = np.random.default_rng(args.seed)
    shape = (args.rows, args.cols)
    w = rng.standard_normal(shape) if args.dist == "normal" else rng.standard_t(3.0, size=shape)
    w = jnp.asarray(w * 0.02, jnp.float32).astype(args.dtype)
    x = rng.standard_normal((64, args.cols))
    # LLM activations have a few large channels; weigh k-means by their magnitude.
    big = 1.0 + 9.0 * (rng.uniform(size=args.cols) > 0.98)
    x = jnp.asarray(x * big, jnp.float32)
    xbar = jnp.abs(x).mean(0)
    w32 = w.astype(jnp.float32)
    y_ref = x @ w32.T

    rows = []
    print(f"quantizing a {args.rows} x {args.cols} {args.dist} {args.dtype} matrix, "
          f"group size {args.group_size or 'row'}", file=sys.stderr)
    for fmt in args.formats:
        cfg = QuantConfig(format=fmt, group_size=args.group_size)
        t0 = time.perf_counter()
        qw = quantize_weight(w, cfg, sample_weight=xbar, progress=True, name=fmt)
        jax.block_until_ready(qw.codes)
        dt = time.perf_counter() - t0
        wq = qw.dequantize(jnp.float32)
        err = float(jnp.linalg.norm(wq - w32) / jnp.linalg.norm(w32))
        yerr = float(jnp.linalg.norm(x @ wq.T - y_ref) / jnp.linalg.norm(y_ref))
        rows.append({
            "format": fmt, "bits_per_weight": round(qw.bits_per_weight(), 4),
            "weight_rel_error": err, "sqnr_db": float(-20 * np.log10(err)),
            "output_rel_error": yerr, "seconds": dt,
        })
    print("| format | bits/weight | weight rel. error | SQNR (dB) | output rel. error | time (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['bits_per_weight']:.3f} | {r['weight_rel_error']:.4f} | "
              f"{r['sqnr_db']:.2f} | {r['output_rel_error']:.4f} | {r['seconds']:.2f} |")
    if args.json_path:
        meta = {k: v for k, v in vars(args).items() if k not in ("func", "formats")}
        with open(args.json_path, "w") as f:
            json.dump({"settings": meta, "device": str(jax.devices()[0]), "results": rows}, f,
                      indent=2)
        print(f"wrote {args.json_path}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="any4", description="any4: learned 4-bit weight quantization for LLMs in JAX."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_quantize_matrix(sub)
    add_model_commands(sub)
    add_quant_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    fix_defaults(args)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, *cli_errors()) as e:
        print(f"any4 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
