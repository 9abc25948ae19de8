"""`any4 quantize` and `any4 calibrate`: whole-model quantization from the command line."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import time

import jax
import numpy as np

from any4_jax import distributed, outputs
from any4_jax.checkpoint import check_output, directory_bytes, save_quantized
from any4_jax.cli import args as cli_args
from any4_jax.cli import bcq as bcq_cli
from any4_jax.cli import distributed as dist_cli
from any4_jax.cli.model import load, use_kernel
from any4_jax.eval.data import load_text
from any4_jax.eval.perplexity import perplexity
from any4_jax.nn import QuantDense, dense_layers
from any4_jax.ptq.awq import AWQConfig
from any4_jax.ptq.calibrate import (
    CalibrationConfig,
    calibration_tokens,
    collect_offline,
    finalize,
)
from any4_jax.ptq.quantize_model import model_bytes, quantize_model, select_layers
from any4_jax.quant.config import KMeansConfig, QuantConfig
from any4_jax.quant.gptq import GPTQConfig


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def calibration_text(args) -> str | None:
    """The --calibration text (None for the prompt or none): read before any model is loaded,
    so a bad source fails at once."""
    if args.calibration in ("prompt", "none"):
        return None
    return load_text(args.calibration, flag="--calibration")[0]


def calibration(args, tokenizer, text: str | None = None):
    """(CalibrationConfig, tokens [n, t] or None, a description) from the --calibration flags
    (`text`: what `calibration_text` read)."""
    src = args.calibration
    cfg = CalibrationConfig(
        source="prompt" if src in ("prompt", "none") else "text", num_samples=args.num_samples,
        seq_len=args.calib_seq_len, statistic=args.statistic, mode=args.calib_mode,
        seed=args.calib_seed, batch_size=args.calib_batch_size)
    if src == "none":
        return cfg, None, {"source": "none"}
    if text is None and src != "prompt":
        text = calibration_text(args)
    tokens = calibration_tokens(tokenizer.encode, cfg, text)
    desc = {"source": src, "mode": cfg.mode, "statistic": cfg.statistic,
            "sequences": int(tokens.shape[0]), "tokens_per_sequence": int(tokens.shape[1]),
            "batch_size": cfg.batch_size}
    if src != "prompt":
        desc.update(num_samples=cfg.num_samples, seq_len=cfg.seq_len, seed=cfg.seed)
    return cfg, tokens, desc


def _load_stats(path: str, statistic: str):
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


def _kmeans_config(args) -> KMeansConfig:
    try:
        return KMeansConfig(method=args.kmeans_method, init=args.init, max_iter=args.max_iter,
                            tol=args.tol, seed=args.seed)
    except ValueError:
        if args.kmeans_method != "optimal":
            raise
        raise ValueError("--init, --max-iter, --tol and --seed apply to --kmeans-method lloyd "
                         "only (the optimal solver has no initialisation, iterations or "
                         "randomness): drop them, or pass --kmeans-method lloyd") from None


def _run_quantize(args) -> int:
    qcfg = QuantConfig(format=args.format, group_size=args.group_size, symmetric=args.symmetric,
                       sample_weighting=args.sample_weighting, kmeans=_kmeans_config(args),
                       **bcq_cli.bcq_fields(args))
    codebooks, act_quant = bcq_cli.codebooks_and_act_quant(args, qcfg)
    gptq = GPTQConfig(percdamp=args.percdamp, block=args.gptq_block, act_order=args.act_order)
    awq = AWQConfig(grid=args.awq_grid)
    if args.method != "rtn" and (args.calibration == "none" or args.stats
                                 or args.calib_mode != "sequential"):
        raise ValueError(f"--method {args.method} needs calibration tokens in sequential mode "
                         "(it works on each layer's inputs): drop --calibration none / --stats "
                         "/ --calib-mode offline")
    # every input and output checked before the model is loaded
    if args.out:
        args.previous_output = check_output(args.out, overwrite=args.overwrite).exists()
    if args.json_path:
        outputs.check_file_output(args.json_path, what="--json")
    for pattern, changes in args.override or []:  # the settings now, the patterns once
        try:                                        # the model's layers are known
            qcfg.replace(**changes)
        except ValueError as e:
            raise ValueError(f"--override {pattern!r}: {e}") from None
    stats = _load_stats(args.stats, args.statistic) if args.stats else None
    if args.calibration == "none" and qcfg.uses_activation_stats and stats is None:
        qcfg = qcfg.replace(sample_weighting="none")
        _log(f"--calibration none: {qcfg.format} without activation sample weights")
    sharded = dist_cli.wanted(args)
    if sharded and not dist_cli.file_path_blockers(args, qcfg, stats):
        return dist_cli.run_files(args, qcfg, stats)
    if sharded:
        dist_cli.check_model_path(args)
    calib_text = calibration_text(args)
    eval_text = load_text(args.text)[0] if args.eval else None
    if sharded:  # every process loads the model; rows and batches are shared out
        dist_cli.join(args)
    primary = distributed.is_primary()
    t0 = time.perf_counter()
    lm = load(args)
    dense_bytes = model_bytes(lm.model)["other"]
    calib, tokens, calib_desc = calibration(args, lm.tokenizer, calib_text)
    if stats is not None:
        calib_desc = {"source": f"stats file {args.stats}", "statistic": args.statistic}
    overrides = dict(args.override or [])
    qmodel, rep = quantize_model(lm.model, qcfg, calibration=calib, tokens=tokens, stats=stats,
                                 include=args.include or ("*",), exclude=args.exclude,
                                 overrides=overrides, method=args.method, gptq=gptq,
                                 awq=awq, codebooks=codebooks, act_quant=act_quant,
                                 in_place=True, progress=primary)
    total_s = time.perf_counter() - t0
    if rep.uncalibrated_experts and primary:
        idle = sum(len(v) for v in rep.uncalibrated_experts.values())
        _log(f"{idle} expert(s) in {len(rep.uncalibrated_experts)} layer(s) received no "
             "calibration token: their rows were quantized with uncalibrated sample weights "
             "(more calibration text routes tokens to them)")
    del lm.model
    mb = model_bytes(qmodel)
    # over every quantized layer of the model: a checkpoint quantized further keeps its own
    n_q = sum(layer.meta.shape[0] * layer.meta.shape[1] for _, layer in dense_layers(qmodel)
              if isinstance(layer, QuantDense))
    bpw = 8 * mb["quantized"] / n_q
    dense_q_bytes = n_q * jax.numpy.dtype(qmodel.dtype).itemsize
    if primary:  # one table for the job
        print("| model | format | group | layers | bits/weight | memory MB (dense) | "
              "calibration s | quantize s | total s |")
        print("|---|---|---|---|---|---|---|---|---|")
        mem = (mb["quantized"] + mb["other"]) / 2**20
        group = (f"Lb{qcfg.block_len}/La{qcfg.array_len}/Nc{qcfg.n_codebooks}"
                 if qcfg.format == "bcq" else qcfg.group_size or "row")
        print(f"| {os.path.basename(lm.source)} | {qcfg.format} | {group} | "
              f"{len(rep.layers)} | {bpw:.3f} | {mem:.1f} ({dense_bytes / 2**20:.1f}) | "
              f"{rep.calibration_seconds:.1f} | {rep.quantize_seconds:.1f} | {total_s:.1f} |")
        _log(f"quantized layers: {n_q / 1e6:.1f}M weights, {mb['quantized'] / 2**20:.1f} MB "
             f"(dense {qmodel.dtype}: {dense_q_bytes / 2**20:.1f} MB); unquantized arrays "
             f"(embedding, norms): {mb['other'] / 2**20:.1f} MB")
    record = {
        "model": lm.source, "quantization": {**dataclasses.asdict(qcfg), "overrides": overrides,
                                             "include": list(args.include or ["*"]),
                                             "exclude": list(args.exclude),
                                             "method": args.method,
                                             **({"gptq": dataclasses.asdict(gptq)}
                                                if args.method == "gptq" else {}),
                                             **({"awq": dataclasses.asdict(awq)}
                                                if args.method == "awq" else {})},
        "calibration": calib_desc, "report": rep.to_dict(),
        "seconds_total_with_load": total_s, "bits_per_weight": bpw,
        **({"format_bits_per_weight": bcq_cli.format_bits(qcfg),
            "codebooks": args.codebooks or "local"} if qcfg.format == "bcq" else {}),
        "act_quant": None if act_quant is None else {
            **act_quant.to_dict(), "codebooks": "from --codebooks" if act_quant.codebooks
            else None},
        "memory_bytes": {"model": mb["quantized"] + mb["other"], "dense_model": dense_bytes,
                         "quantized_layers": mb["quantized"]},
        "device": str(jax.devices()[0]),
        **({"distributed": distributed.describe()} if sharded else {}),
    }
    if args.out:  # collective under --distributed
        final = save_quantized(args.out, qmodel, tokenizer=lm.tokenizer, metadata=record,
                               overwrite=args.overwrite)
        args.written = str(final)
        if primary:
            _log(f"wrote {final} ({directory_bytes(final) / 2**20:.1f} MB on disk)")
    if not primary:  # every process holds the same model: the first evaluates and reports
        return 0
    if args.eval:
        use_kernel(qmodel, args.kernel)
        ids = lm.tokenizer.encode(eval_text)
        r = perplexity(qmodel, ids, seq_len=args.seq_len, max_windows=args.max_windows)
        print(f"\nperplexity on {args.text} ({r.windows} x {r.seq_len} tokens): {r.ppl:.4f}")
        record["eval"] = {"text": args.text, **r.to_dict()}
    if args.json_path:
        outputs.write_json(args.json_path, record)
        _log(f"wrote {args.json_path}")
    return 0


def _run_calibrate(args) -> int:
    if args.calibration == "none":
        raise ValueError("--calibration none has nothing to compute")
    outputs.check_file_output(args.out, what="--out")
    text = calibration_text(args)
    if dist_cli.wanted(args):  # data parallel: each process runs a share of the batches
        dist_cli.join(args)
    primary = distributed.is_primary()
    lm = load(args)
    calib, tokens, desc = calibration(args, lm.tokenizer, text)
    paths = select_layers(lm.model, args.include or ("*",), args.exclude)
    t0 = time.perf_counter()
    sums, count = collect_offline(lm.model, tokens, paths, batch_size=calib.batch_size,
                                  progress=primary)
    if not primary:  # every process holds the same statistics; the first writes them
        return 0
    arrays = {}
    for stat in ("abs_of_mean", "mean_of_abs"):
        for k, v in finalize(sums, count, stat).items():
            arrays[f"{stat}/{k}"] = v
    n = -(-len(tokens) // calib.batch_size)
    meta = {"model": lm.source, "tokens": count, **desc, "processes": jax.process_count(),
            "batches_per_process": [len(distributed.share_of(n, q))
                                    for q in range(jax.process_count())]}
    arrays["__meta__"] = np.asarray(json.dumps(meta))
    out = args.out
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    outputs.atomic_write(out, buf.getvalue())
    _log(f"{len(paths)} layers, {count} tokens, {time.perf_counter() - t0:.1f} s; wrote {out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("quantize", help="quantize every decoder Dense of a model",
                       description="Quantize a model's decoder Dense layers (lm_head and the "
                       "embedding excluded by default), optionally evaluate, save a checkpoint.")
    cli_args.add_model(p)
    cli_args.add_quant_settings(p)
    bcq_cli.add_bcq_settings(p)
    cli_args.add_calibration(p)
    p.add_argument("--stats", help="activation statistics from `any4 calibrate` (npz)")
    cli_args.add_layer_selection(p, overrides=True)
    p.add_argument("--out", help="write a checkpoint directory here")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--eval", action="store_true", help="evaluate perplexity afterwards")
    p.add_argument("--text", default="prideprejudice")
    p.add_argument("--seq-len", type=cli_args.positive_int, default=2048)
    p.add_argument("--max-windows", type=cli_args.positive_int, default=16)
    p.add_argument("--json", dest="json_path", help="write the run's record as JSON")
    dist_cli.add_flags(p)
    p.set_defaults(func=_run_quantize)

    p = sub.add_parser("calibrate", help="save activation statistics for `quantize --stats`",
                       description="One forward of the unquantized model (offline mode) over "
                       "the calibration input; both statistics saved to an npz file.")
    cli_args.add_model(p, kernel=False)
    cli_args.add_calibration(p)
    cli_args.add_layer_selection(p)
    p.add_argument("--out", required=True, help="the .npz file to write")
    dist_cli.add_flags(p, "calibrate")
    p.set_defaults(func=_run_calibrate)
