"""`any4 analyze` (per-layer errors of several formats on a model) and `any4 quantize-matrix`
(the formats on one random matrix)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from any4_jax import outputs
from any4_jax.cli import args as cli_args
from any4_jax.cli.model import load
from any4_jax.cli.quantize import calibration, calibration_text
from any4_jax.eval import analyze as A
from any4_jax.ptq.quantize_model import select_layers
from any4_jax.quant.config import DEFAULT_GROUP_SIZE, QuantConfig
from any4_jax.quant.formats import FORMAT_NAMES
from any4_jax.quant.quantize import quantize_weight


def _run_analyze(args) -> int:
    if args.calibration == "none":
        raise ValueError("--calibration none: the output error needs calibration inputs")
    out = Path(args.out)
    if os.path.lexists(out) and not out.is_dir():
        raise outputs.OutputError(f"--out {out} exists and is not a directory; choose another "
                                  "path")
    for name in ("analysis.json", "summary.md"):
        outputs.check_file_output(out / name, what="--out")
    text = calibration_text(args)
    lm = load(args)
    _, tokens, desc = calibration(args, lm.tokenizer, text)
    tokens = tokens[:, :args.max_tokens] if tokens.shape[0] == 1 else tokens[
        :max(1, args.max_tokens // tokens.shape[1])]
    paths = select_layers(lm.model, args.include or ("*",), args.exclude)
    results, qws = A.analyze(lm.model, tokens, paths, args.formats,
                             group_size=args.group_size, statistic=args.statistic)
    table = A.summary_table(results, args.formats)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    files = A.write_outputs(results, args.formats, args.out)
    row_layer = args.row_layer or paths[0]
    any_fmt = next((f for f in args.formats if f.startswith("any")), None)
    if any_fmt and row_layer in qws:
        files["row_png"] = A.plot_row_histogram(
            lm.model, row_layer, args.row, qws[row_layer][any_fmt],
            os.path.join(args.out, "row_histogram.png"), group_size=args.group_size)
    rec = {"model": lm.source, "formats": args.formats, "group_size": args.group_size,
           "calibration": desc, "layers": [dataclasses.asdict(r) for r in results],
           "files": files}
    with open(os.path.join(args.out, "analysis.json"), "w") as fh:
        json.dump(rec, fh, indent=2)
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(table + "\n")
    print(f"wrote {args.out}/analysis.json, summary.md, " + ", ".join(
        os.path.basename(f) for f in files.values()), file=sys.stderr)
    return 0


def _add_quantize_matrix(sub) -> None:
    p = sub.add_parser(
        "quantize-matrix",
        help="quantize a random weight matrix with several formats and compare their errors",
        description="Quantizes one random [rows, cols] matrix with each format and prints the "
        "weight error, the output error on random activations, bits per weight and the time.",
    )
    p.add_argument("--rows", type=cli_args.positive_int, default=2048,
                   help="N = out_features (default 2048)")
    p.add_argument("--cols", type=cli_args.positive_int, default=2048,
                   help="K = in_features (default 2048)")
    p.add_argument("--formats", type=cli_args.formats,
                   default=cli_args.formats("int4,fp4,nf4,any4"),
                   help=f"comma-separated, from {', '.join(FORMAT_NAMES)}")
    p.add_argument("--group-size", type=cli_args.group_size, default=DEFAULT_GROUP_SIZE,
                   help=f"elements per group along K, or 'row' (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--dist", choices=("normal", "student-t"), default="student-t",
                   help="weight distribution; student-t (3 dof) has LLM-like outliers")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    p.set_defaults(func=_run_quantize_matrix)


def _run_quantize_matrix(args) -> int:
    if args.json_path:
        outputs.check_file_output(args.json_path, what="--json")
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
        outputs.write_json(args.json_path, {"settings": meta, "device": str(jax.devices()[0]),
                                            "results": rows})
        print(f"wrote {args.json_path}", file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("analyze", help="per-layer error of several formats; table, JSON, PNGs",
                       description="Quantize each selected layer alone with each format; "
                       "report weight error and output error on calibration activations.")
    cli_args.add_model(p, kernel=False)
    p.add_argument("--formats", type=cli_args.formats,
                   default=cli_args.formats("int4,nf4,fp4,any4"))
    p.add_argument("--group-size", type=cli_args.group_size, default=cli_args.MODEL_GROUP_SIZE,
                   help=f"elements per group along K, or 'row' (default "
                        f"{cli_args.MODEL_GROUP_SIZE}, as `quantize`)")
    cli_args.add_calibration(p)
    p.add_argument("--max-tokens", type=cli_args.positive_int, default=2048,
                   help="calibration tokens used for the output error (default 2048)")
    cli_args.add_layer_selection(p)
    p.add_argument("--row-layer", help="layer of the row histogram (default: the first)")
    p.add_argument("--row", type=cli_args.nonnegative_int, default=0)
    p.add_argument("--out", default="analysis", help="output directory (default analysis/)")
    p.set_defaults(func=_run_analyze)
    _add_quantize_matrix(sub)
