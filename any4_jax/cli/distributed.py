"""`any4 quantize --distributed`: one command per process, joined by `jax.distributed`
(docs/distributed.md)."""

from __future__ import annotations

import dataclasses
import sys

from any4_jax import distributed, outputs
from any4_jax.cli import args as cli_args
from any4_jax.loading import default_model_path, detect_format

_WHAT = {"quantize": "rows of every matrix split over the processes, the checkpoint written "
                     "collectively",
         "eval": "the quantized layers split over every device of every process (tensor "
                 "parallel), the perplexity loop jitted over the global mesh"}


def add_flags(p, what: str = "quantize") -> None:
    g = p.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--distributed", action="store_true",
                   help=f"run as one process of a multi-process job: {_WHAT[what]} "
                   "(auto-detected on SLURM / Cloud TPU; or the three flags below, or "
                   "$JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES / $JAX_PROCESS_ID)")
    g.add_argument("--coordinator", help="host:port of process 0 (manual launches)")
    g.add_argument("--num-processes", type=cli_args.positive_int, help="processes in the job")
    g.add_argument("--process-id", type=cli_args.nonnegative_int, help="this process, 0-based")


def wanted(args) -> bool:
    return bool(args.distributed or args.coordinator or args.num_processes is not None
                or args.process_id is not None)


def join(args) -> dict:
    """Joins the job the flags describe; says so on the first process."""
    info = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if distributed.is_primary():
        print(f"jax.distributed: {info['processes']} processes, {info['devices']} devices "
              f"({info['local_devices']} here)", file=sys.stderr)
    return info


def run(args, qcfg, stats) -> int:
    """Checks the flags that the multi-process path cannot take, joins the job, quantizes."""
    from any4_jax.distributed_quantize import quantize_hf_files

    path = args.model or default_model_path()
    bad = []
    if detect_format(path) != "hf":
        bad.append(f"{path} is not a Hugging Face directory (the processes read rows of its "
                   "safetensors files)")
    if not args.out:
        bad.append("--out is required (the checkpoint is the result)")
    if args.eval:
        bad.append("--eval runs in one process: evaluate the checkpoint afterwards")
    if args.method != "rtn":
        bad.append(f"--method {args.method} needs the model's forward pass on every process")
    if qcfg.uses_activation_stats and stats is None:
        bad.append(f"{qcfg.format} with activation sample weights needs --stats FILE (from "
                   "`any4 calibrate`, run once in one process), or --calibration none")
    if args.act_quant or args.codebooks:
        bad.append("--act-quant / --codebooks are single-process options")
    if bad:
        raise ValueError("--distributed: " + "; ".join(bad))
    join(args)
    primary = distributed.is_primary()
    dtype = None if args.dtype == "auto" else args.dtype
    rep = quantize_hf_files(path, qcfg, args.out, stats=stats,
                            include=args.include or ("*",), exclude=args.exclude,
                            overrides=dict(args.override or []), param_dtype=dtype,
                            metadata={"model": path, "quantization": dataclasses.asdict(qcfg)},
                            overwrite=args.overwrite, progress=primary)
    if primary:
        print(f"| processes | layers | rows quantized here | seconds | out |\n|---|---|---|---|---|"
              f"\n| {rep['processes']} | {rep['layers']} | {rep['rows_this_process']} | "
              f"{rep['seconds']:.1f} | {rep['out']} |")
        if args.json_path:
            outputs.write_json(args.json_path, rep)
    return 0
