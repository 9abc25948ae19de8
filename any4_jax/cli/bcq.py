"""LO-BCQ on the command line: the `--format bcq` / `--act-quant` flags of `any4 quantize`
and `any4 bcq-calibrate` (universal codebooks, docs/bcq.md)."""

from __future__ import annotations

import json
import sys
import time

from any4_jax import outputs
from any4_jax.cli import args as cli_args
from any4_jax.cli.model import load
from any4_jax.ptq.bcq import learn_codebooks
from any4_jax.ptq.quantize_model import select_layers
from any4_jax.quant.act_quant import ACT_KINDS, ActQuantConfig
from any4_jax.quant.bcq import bits_per_scalar
from any4_jax.quant.bcq_codebooks import BCQCodebooks
from any4_jax.quant.bcq_fit import BCQFitConfig
from any4_jax.quant.config import QuantConfig

_BCQ_FLAGS = ("block_len", "array_len", "n_codebooks", "codebook_bits")


def add_bcq_settings(p, *, act: bool = True) -> None:
    g = p.add_argument_group("LO-BCQ (--format bcq)")
    g.add_argument("--block-len", type=cli_args.positive_int, default=8,
                   help="scalars per block; each block picks a codebook (8)")
    g.add_argument("--array-len", type=cli_args.positive_int, default=64,
                   help="scalars per block array; one 8-bit scale each (64)")
    g.add_argument("--n-codebooks", type=cli_args.positive_int, default=16,
                   help="codebooks shared by all blocks, at most 16 (16)")
    g.add_argument("--codebook-bits", type=cli_args.positive_int, default=6,
                   help="bits of a signed integer codebook entry (6)")
    g.add_argument("--bcq-max-iter", type=cli_args.nonnegative_int, default=50,
                   help="LO-BCQ steps at most when learning codebooks (50)")
    g.add_argument("--bcq-tol", type=cli_args.nonnegative_float, default=1e-4,
                   help="stop once a step lowers the MSE by less than this fraction (1e-4)")
    blocks = 1 << 15 if act else 1 << 17  # per layer (local) / once for the model (universal)
    g.add_argument("--bcq-max-blocks", type=cli_args.positive_int, default=blocks,
                   help=f"learn codebooks on at most this many blocks ({blocks})")
    g.add_argument("--bcq-seed", type=int, default=0, help="the draw of those blocks (0)")
    if act:
        g.add_argument("--codebooks", help="universal codebooks from `any4 bcq-calibrate` "
                       "(default: local codebooks learned per layer)")
        g.add_argument("--act-quant", choices=ACT_KINDS, default=None,
                       help="simulate W4A4: fake-quantize every quantized layer's input; bcq "
                       "needs --codebooks learned with --activations; int4: per-token groups")
        g.add_argument("--act-group-size", type=cli_args.positive_int, default=64,
                       help="--act-quant int4: elements per group (64)")


def bcq_fields(args) -> dict:
    """The QuantConfig fields of the bcq flags (none unless --format bcq, so that a bcq flag
    given with another format is QuantConfig's error)."""
    given = {f: getattr(args, f) for f in _BCQ_FLAGS}
    fit = BCQFitConfig(max_iter=args.bcq_max_iter, tol=args.bcq_tol,
                       max_blocks=args.bcq_max_blocks, seed=args.bcq_seed)
    if args.format != "bcq":
        return {k: v for k, v in given.items() if v != QuantConfig.__dataclass_fields__[k].default}
    return {**given, "bcq_fit": fit}


def codebooks_and_act_quant(args, qcfg: QuantConfig):
    """(BCQCodebooks or None, ActQuantConfig or None) from --codebooks / --act-quant, checked
    before the model loads."""
    cb = BCQCodebooks.load(args.codebooks) if args.codebooks else None
    if cb is not None and qcfg.format != "bcq" and args.act_quant != "bcq":
        raise ValueError("--codebooks applies to --format bcq or --act-quant bcq")
    if cb is not None and qcfg.format == "bcq":
        diff = cb.matches(qcfg)
        if diff:
            raise ValueError(f"--codebooks {args.codebooks}: learned for other settings "
                             f"({'; '.join(diff)}); pass the same flags or re-learn them")
    aq = None
    if args.act_quant == "int4":
        aq = ActQuantConfig(kind="int4", group_size=args.act_group_size)
    elif args.act_quant == "bcq":
        if cb is None or cb.activations is None:
            raise ValueError("--act-quant bcq needs activation codebooks: --codebooks FILE "
                             "from `any4 bcq-calibrate MODEL --activations --out FILE`")
        aq = ActQuantConfig(kind="bcq", block_len=cb.block_len, array_len=cb.array_len,
                            codebook_bits=cb.codebook_bits,
                            codebooks=tuple(map(tuple, cb.activations.tolist())))
    return cb, aq


def format_bits(qcfg: QuantConfig, shape=None) -> float | None:
    if qcfg.format != "bcq":
        return None
    return bits_per_scalar(block_len=qcfg.block_len, array_len=qcfg.array_len,
                           n_codebooks=qcfg.n_codebooks, codebook_bits=qcfg.codebook_bits,
                           shape=shape)


def _run_bcq_calibrate(args) -> int:
    from any4_jax.cli.quantize import _load_stats, calibration, calibration_text

    fit = BCQFitConfig(max_iter=args.bcq_max_iter, tol=args.bcq_tol,
                       max_blocks=args.bcq_max_blocks, seed=args.bcq_seed)
    qcfg = QuantConfig(format="bcq", **{f: getattr(args, f) for f in _BCQ_FLAGS},
                       sample_weighting=args.sample_weighting, bcq_fit=fit)
    outputs.check_file_output(args.out, what="--out")
    if args.sample_weighting != "none" and not args.stats:
        raise ValueError(f"--sample-weighting {args.sample_weighting} needs --stats (from "
                         "`any4 calibrate`)")
    if args.activations and args.calibration == "none":
        raise ValueError("--activations needs calibration text (drop --calibration none)")
    stats = _load_stats(args.stats, args.statistic) if args.stats else None
    text = calibration_text(args) if args.activations else None
    t0 = time.perf_counter()
    lm = load(args)
    paths = select_layers(lm.model, args.include or ("*",), args.exclude)
    tokens = calibration(args, lm.tokenizer, text)[1] if args.activations else None
    cb = learn_codebooks(lm.model, qcfg, paths, stats=stats, tokens=tokens,
                         activations=args.activations, progress=True, source=lm.source)
    cb.save(args.out)
    w = cb.info["weights"]
    msg = (f"{len(paths)} layers; weight codebooks: {w['blocks']} blocks, {w['iters']} steps, "
           f"MSE {w['mse_float'][0]:.4g} -> {w['mse'][-1]:.4g}, {w['seconds']:.1f} s")
    if cb.activations is not None:
        a = cb.info["activations"]
        msg += (f"; activation codebooks: {a['blocks']} blocks, {a['iters']} steps, MSE "
                f"{a['mse_float'][0]:.4g} -> {a['mse'][-1]:.4g}, {a['seconds']:.1f} s")
    print(msg, file=sys.stderr)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if args.json_path:
        outputs.write_json(args.json_path, {"out": args.out, "info": json.loads(
            json.dumps(cb.info, default=float))})
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("bcq-calibrate", help="learn universal LO-BCQ codebooks for a model",
                       description="Learn LO-BCQ codebooks once from a model's weights (and, "
                       "with --activations, from its layers' inputs on calibration text) and "
                       "save them for `any4 quantize --format bcq --codebooks FILE`.")
    cli_args.add_model(p, kernel=False)
    add_bcq_settings(p, act=False)
    p.add_argument("--sample-weighting", choices=("none", "activations",
                                                  "activations_x_scales"), default="none",
                   help="weight codebooks: weigh each scalar by its input channel's statistic "
                        "(needs --stats) and its array's scale; default none")
    p.add_argument("--stats", help="activation statistics from `any4 calibrate` (npz)")
    p.add_argument("--activations", action="store_true",
                   help="also learn activation codebooks (for --act-quant bcq)")
    cli_args.add_calibration(p)
    cli_args.add_layer_selection(p)
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--json", dest="json_path", help="also write how they were learned as JSON")
    p.set_defaults(func=_run_bcq_calibrate)
