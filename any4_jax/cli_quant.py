"""`any4 quantize` and `any4 calibrate`: whole-model quantization from the command line."""

from __future__ import annotations

import json
import os
import sys
import time


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _override(text: str):
    """'PATTERN:key=value[,key=value]' -> (pattern, {key: value})."""
    import argparse

    pattern, sep, rest = text.partition(":")
    if not sep or not rest:
        raise argparse.ArgumentTypeError(
            f"--override {text!r}: expected PATTERN:key=value[,key=value], e.g. "
            "'down_proj:group_size=128'")
    changes = {}
    for item in rest.split(","):
        k, eq, v = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--override {text!r}: {item!r} is not key=value")
        k = k.strip().replace("-", "_")
        if k == "group_size":
            changes[k] = None if v in ("row", "none") else int(v)
        elif k == "symmetric":
            changes[k] = v.lower() in ("1", "true", "yes")
        elif k in ("format", "sample_weighting", "dtype"):
            changes[k] = v
        else:
            raise argparse.ArgumentTypeError(
                f"--override {text!r}: unknown key {k!r} (format, group_size, symmetric, "
                "sample_weighting, dtype)")
    return pattern, changes


def _calib_args(p):
    p.add_argument("--calibration", default="prompt",
                   help="prompt (default: the built-in diverse prompt), none, or a text source "
                        "(sensesensibility, a file path) for random windows")
    p.add_argument("--calib-mode", choices=("sequential", "offline"), default="sequential")
    p.add_argument("--statistic", choices=("abs_of_mean", "mean_of_abs"), default="abs_of_mean")
    p.add_argument("--num-samples", type=int, default=128,
                   help="windows of a calibration text (default 128)")
    p.add_argument("--calib-seq-len", type=int, default=512,
                   help="tokens per calibration window (default 512)")
    p.add_argument("--calib-seed", type=int, default=0)


def _calibration(args, tokenizer):
    from any4_jax.eval.data import load_text
    from any4_jax.quant.calibrate import CalibrationConfig, calibration_tokens

    src = args.calibration
    cfg = CalibrationConfig(
        source="prompt" if src in ("prompt", "none") else "text", num_samples=args.num_samples,
        seq_len=args.calib_seq_len, statistic=args.statistic, mode=args.calib_mode,
        seed=args.calib_seed)
    if src == "none":
        return cfg, None, {"source": "none"}
    text = None if src == "prompt" else load_text(src)[0]
    tokens = calibration_tokens(tokenizer.encode, cfg, text)
    desc = {"source": src, "mode": cfg.mode, "statistic": cfg.statistic,
            "sequences": int(tokens.shape[0]), "tokens_per_sequence": int(tokens.shape[1])}
    if src != "prompt":
        desc.update(num_samples=cfg.num_samples, seq_len=cfg.seq_len, seed=cfg.seed)
    return cfg, tokens, desc


def _load_stats(path: str, statistic: str):
    import numpy as np

    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--stats {path}: not a readable .npz file ({e})") from None
    prefix = f"{statistic}/"
    stats = {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}
    if not stats:
        raise ValueError(f"--stats {path}: no {statistic!r} statistics inside (written by "
                         "`any4 calibrate`?)")
    return stats


def _run_quantize(args) -> int:
    import jax

    from any4_jax.checkpoint import directory_bytes, save_quantized
    from any4_jax.cli_model import _load
    from any4_jax.quant.config import KMeansConfig, QuantConfig
    from any4_jax.quant.model_quant import model_bytes, quantize_model

    qcfg = QuantConfig(format=args.format, group_size=args.group_size, symmetric=args.symmetric,
                       sample_weighting=args.sample_weighting,
                       kmeans=KMeansConfig(init=args.init, max_iter=args.max_iter, tol=args.tol,
                                           seed=args.seed))
    if args.out and os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists; pass --overwrite or choose another")
    t0 = time.perf_counter()
    lm = _load(args)
    dense_bytes = model_bytes(lm.model)["other"]
    calib, tokens, calib_desc = _calibration(args, lm.tokenizer)
    stats = _load_stats(args.stats, args.statistic) if args.stats else None
    if stats is not None:
        calib_desc = {"source": f"stats file {args.stats}", "statistic": args.statistic}
    overrides = dict(args.override or [])
    if args.calibration == "none" and qcfg.spec.family == "any" and \
            qcfg.sample_weighting != "none" and stats is None:
        qcfg = qcfg.replace(sample_weighting="none")
        _log("--calibration none: any-n k-means without sample weights")
    qmodel, rep = quantize_model(lm.model, qcfg, calibration=calib, tokens=tokens, stats=stats,
                                 include=args.include or ("*",), exclude=args.exclude,
                                 overrides=overrides, in_place=True)
    total_s = time.perf_counter() - t0
    del lm.model
    mb = model_bytes(qmodel)
    n_q = sum(r.shape[0] * r.shape[1] for r in rep.layers)
    bpw = 8 * mb["quantized"] / n_q
    dense_q_bytes = sum(r.shape[0] * r.shape[1] for r in rep.layers) * jax.numpy.dtype(
        qmodel.dtype).itemsize
    print("| model | format | group | layers | bits/weight | memory MB (dense) | "
          "calibration s | quantize s | total s |")
    print("|---|---|---|---|---|---|---|---|---|")
    mem = (mb["quantized"] + mb["other"]) / 2**20
    print(f"| {os.path.basename(lm.source)} | {qcfg.format} | {qcfg.group_size or 'row'} | "
          f"{len(rep.layers)} | {bpw:.3f} | {mem:.1f} ({dense_bytes / 2**20:.1f}) | "
          f"{rep.calibration_seconds:.1f} | {rep.quantize_seconds:.1f} | {total_s:.1f} |")
    _log(f"quantized layers: {n_q / 1e6:.1f}M weights, {mb['quantized'] / 2**20:.1f} MB "
         f"(dense {qmodel.dtype}: {dense_q_bytes / 2**20:.1f} MB); unquantized arrays "
         f"(embedding, norms): {mb['other'] / 2**20:.1f} MB")
    record = {
        "model": lm.source, "quantization": {**_config_dict(qcfg), "overrides": overrides,
                                             "include": list(args.include or ["*"]),
                                             "exclude": list(args.exclude)},
        "calibration": calib_desc, "report": rep.to_dict(),
        "seconds_total_with_load": total_s, "bits_per_weight": bpw,
        "memory_bytes": {"model": mb["quantized"] + mb["other"], "dense_model": dense_bytes,
                         "quantized_layers": mb["quantized"]},
        "device": str(jax.devices()[0]),
    }
    if args.out:
        final = save_quantized(args.out, qmodel, tokenizer=lm.tokenizer, metadata=record,
                               overwrite=args.overwrite)
        _log(f"wrote {final} ({directory_bytes(final) / 2**20:.1f} MB on disk)")
    if args.eval:
        from any4_jax.cli_model import use_kernel
        from any4_jax.eval.data import load_text
        from any4_jax.eval.perplexity import perplexity

        use_kernel(qmodel, args.kernel)
        ids = lm.tokenizer.encode(load_text(args.text)[0])
        r = perplexity(qmodel, ids, seq_len=args.seq_len, max_windows=args.max_windows)
        print(f"\nperplexity on {args.text} ({r.windows} x {r.seq_len} tokens): {r.ppl:.4f}")
        record["eval"] = {"text": args.text, **r.to_dict()}
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(record, fh, indent=2, default=str)
        _log(f"wrote {args.json_path}")
    return 0


def _config_dict(c) -> dict:
    import dataclasses

    return dataclasses.asdict(c)


def _run_calibrate(args) -> int:
    import numpy as np

    from any4_jax.cli_model import _load
    from any4_jax.quant.calibrate import collect_offline, finalize
    from any4_jax.quant.model_quant import select_layers

    if args.calibration == "none":
        raise ValueError("--calibration none has nothing to compute")
    lm = _load(args)
    calib, tokens, desc = _calibration(args, lm.tokenizer)
    paths = select_layers(lm.model, args.include or ("*",), args.exclude)
    t0 = time.perf_counter()
    sums, count = collect_offline(lm.model, tokens, paths, batch_size=calib.batch_size,
                                  progress=True)
    arrays = {}
    for stat in ("abs_of_mean", "mean_of_abs"):
        for k, v in finalize(sums, count, stat).items():
            arrays[f"{stat}/{k}"] = v
    meta = {"model": lm.source, "tokens": count, **desc}
    arrays["__meta__"] = np.asarray(json.dumps(meta))
    out = args.out
    tmp = f"{out}.partial-{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    _log(f"{len(paths)} layers, {count} tokens, {time.perf_counter() - t0:.1f} s; wrote {out}")
    return 0


def _run_analyze(args) -> int:
    from any4_jax.cli_model import _load
    from any4_jax.eval import analyze as A
    from any4_jax.quant.model_quant import select_layers

    lm = _load(args)
    _, tokens, desc = _calibration(args, lm.tokenizer)
    if tokens is None:
        raise ValueError("--calibration none: the output error needs calibration inputs")
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
           "calibration": desc, "layers": [dataclasses_asdict(r) for r in results],
           "files": files}
    with open(os.path.join(args.out, "analysis.json"), "w") as fh:
        json.dump(rec, fh, indent=2)
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(table + "\n")
    _log(f"wrote {args.out}/analysis.json, summary.md, " + ", ".join(
        os.path.basename(f) for f in files.values()))
    return 0


def dataclasses_asdict(x):
    import dataclasses

    return dataclasses.asdict(x)


def add_quant_commands(sub) -> None:
    from any4_jax.cli import _group_size
    from any4_jax.cli_model import _model_args
    from any4_jax.quant.config import KMEANS_INITS, SAMPLE_WEIGHTINGS
    from any4_jax.quant.formats import FORMAT_NAMES

    p = sub.add_parser("quantize", help="quantize every decoder Dense of a model",
                       description="Quantize a model's decoder Dense layers (lm_head and the "
                       "embedding excluded by default), optionally evaluate, save a checkpoint.")
    _model_args(p)
    p.add_argument("--format", default="any4", choices=FORMAT_NAMES)
    p.add_argument("--group-size", type=_group_size, default=64,
                   help="elements per group along K, or 'row' (default 64: divides SmolLM2's "
                        "576)")
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--sample-weighting", choices=SAMPLE_WEIGHTINGS,
                   default="activations_x_scales")
    p.add_argument("--init", choices=KMEANS_INITS, default="kmeans++")
    p.add_argument("--max-iter", type=int, default=300)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    _calib_args(p)
    p.add_argument("--stats", help="activation statistics from `any4 calibrate` (npz)")
    p.add_argument("--include", action="append", help="fnmatch pattern of layers to quantize "
                   "(repeatable; default all)")
    p.add_argument("--exclude", action="append", default=None,
                   help="pattern of layers to skip (repeatable; default lm_head)")
    p.add_argument("--override", action="append", type=_override,
                   help="per-layer settings, e.g. 'down_proj:group_size=128' (repeatable)")
    p.add_argument("--out", help="write a checkpoint directory here")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--eval", action="store_true", help="evaluate perplexity afterwards")
    p.add_argument("--text", default="prideprejudice")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--json", dest="json_path", help="write the run's record as JSON")
    p.set_defaults(func=_run_quantize)

    p = sub.add_parser("calibrate", help="save activation statistics for `quantize --stats`",
                       description="One forward of the unquantized model (offline mode) over "
                       "the calibration input; both statistics saved to an npz file.")
    _model_args(p, kernel=False)
    _calib_args(p)
    p.add_argument("--include", action="append")
    p.add_argument("--exclude", action="append", default=None)
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.set_defaults(func=_run_calibrate)

    from any4_jax.cli import _formats

    p = sub.add_parser("analyze", help="per-layer error of several formats; table, JSON, PNGs",
                       description="Quantize each selected layer alone with each format; "
                       "report weight error and output error on calibration activations.")
    _model_args(p, kernel=False)
    p.add_argument("--formats", type=_formats, default=_formats("int4,nf4,fp4,any4"))
    p.add_argument("--group-size", type=_group_size, default=64)
    _calib_args(p)
    p.add_argument("--max-tokens", type=int, default=2048,
                   help="calibration tokens used for the output error (default 2048)")
    p.add_argument("--include", action="append")
    p.add_argument("--exclude", action="append", default=None)
    p.add_argument("--row-layer", help="layer of the row histogram (default: the first)")
    p.add_argument("--row", type=int, default=0)
    p.add_argument("--out", default="analysis", help="output directory (default analysis/)")
    p.set_defaults(func=_run_analyze)


def fix_defaults(args) -> None:
    if getattr(args, "exclude", "unset") is None:
        args.exclude = ["lm_head"]
