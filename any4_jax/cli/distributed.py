"""`any4 quantize --distributed`: one command per process, joined by `jax.distributed`
(docs/distributed.md)."""

from __future__ import annotations

import dataclasses
import sys

from any4_jax import distributed, outputs
from any4_jax.cli import args as cli_args
from any4_jax.loading import default_model_path, detect_format

_WHAT = {"quantize": "rows of every matrix and the calibration batches split over the "
                     "processes, the checkpoint written collectively",
         "calibrate": "the calibration batches split over the processes (data parallel), the "
                      "statistics gathered",
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


def file_path_blockers(args, qcfg, stats) -> list[str]:
    """Why `any4 quantize --distributed` cannot take the file path (each process reads only
    its rows from the safetensors, never the whole model); empty when it can. Otherwise every
    process loads the model and runs `quantize_model` (rows and calibration batches split over
    the processes)."""
    from any4_jax.models.llama.convert_hf import read_hf_config

    path = args.model or default_model_path()
    why = []
    if detect_format(path) != "hf":
        return [f"{path} is not a Hugging Face directory"]
    if read_hf_config(path).is_moe:
        why.append("stacked experts")
    if args.method != "rtn":
        why.append(f"--method {args.method} (a forward pass)")
    if qcfg.uses_activation_stats and stats is None:
        why.append("calibration from text (a forward pass; --stats FILE avoids it)")
    if qcfg.format == "bcq" or args.act_quant or args.codebooks:
        why.append("LO-BCQ / activation quantization")
    if args.eval:
        why.append("--eval")
    if not args.out:
        why.append("no --out")
    return why


def check_model_path(args) -> None:
    """The model-object path's own requirement, before the job starts."""
    if not args.out and not args.eval:
        raise ValueError("--distributed: give --out (the checkpoint, written collectively) "
                         "and/or --eval: otherwise the processes' work is thrown away")


def run_files(args, qcfg, stats) -> int:
    """The file path: joins the job, quantizes each process's rows from the files, writes the
    checkpoint collectively."""
    from any4_jax.distributed_quantize import quantize_hf_files

    path = args.model or default_model_path()
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
