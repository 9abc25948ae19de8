"""One process against N processes on this machine: `any4 quantize` of a model with
calibration from text (the model path of `--distributed`: calibration batches and rows shared
out over the processes), wall time of each command and whether the checkpoints' arrays are
equal bit for bit.

    python scripts/bench_distributed.py [--model DIR] [--processes 2] [--format any4]
        [--group-size 64] [--calibration sensesensibility] [--num-samples 16]
        [--calib-seq-len 512] [--calib-batch-size 4] [--out benchmarks/results/distributed_cpu.json]

Each process gets `--devices-per-process` CPU devices (JAX_NUM_CPU_DEVICES). On one machine
the processes share its cores and memory bandwidth, so this measures the overhead and the
exactness of the multi-process path, not the speed-up of a cluster (where each process has its
own host or GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(cmds: list[list[str]], env: dict, timeout: int) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for c in cmds]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    wall = time.perf_counter() - t0
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode:
            sys.exit(f"a process failed:\n{err[-3000:]}")
    return wall, [o for o, _ in outs]


def _arrays(path) -> dict:
    from flax import nnx

    from any4_jax import checkpoint as ck

    model, *_ = ck.load_quantized(path)
    _, state = nnx.split(model)
    return {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(state)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF directory (default: the embedded SmolLM2)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--devices-per-process", type=int, default=1)
    ap.add_argument("--format", default="any4")
    ap.add_argument("--group-size", default="64")
    ap.add_argument("--calibration", default="sensesensibility")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--calib-batch-size", type=int, default=4)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--out", default="benchmarks/results/distributed_cpu.json")
    a = ap.parse_args()
    from any4_jax.loading import default_model_path

    model = a.model or default_model_path()
    flags = [model, "--format", a.format, "--group-size", a.group_size, "--calibration",
             a.calibration, "--num-samples", str(a.num_samples), "--calib-seq-len",
             str(a.calib_seq_len), "--calib-batch-size", str(a.calib_batch_size)]
    base = [sys.executable, "-m", "any4_jax.cli", "quantize", *flags]
    with tempfile.TemporaryDirectory() as tmp:
        one_dir, many_dir = Path(tmp) / "one", Path(tmp) / "many"
        t_one, out_one = _run([base + ["--out", str(one_dir)]],
                              _env(a.devices_per_process * a.processes), a.timeout)
        print(f"1 process ({a.devices_per_process * a.processes} devices): {t_one:.1f} s",
              flush=True)
        port = _port()
        cmds = [base + ["--out", str(many_dir), "--distributed", "--coordinator",
                        f"localhost:{port}", "--num-processes", str(a.processes),
                        "--process-id", str(i)] for i in range(a.processes)]
        t_many, out_many = _run(cmds, _env(a.devices_per_process), a.timeout)
        print(f"{a.processes} processes ({a.devices_per_process} devices each): {t_many:.1f} s",
              flush=True)
        x, y = _arrays(one_dir), _arrays(many_dir)
        differ = [k for k in x if not np.array_equal(x[k], y.get(k))]
        meta = json.loads((many_dir / "any4.json").read_text())["run"]
    rec = {
        "command": "python scripts/bench_distributed.py " + " ".join(sys.argv[1:]),
        "model": model, "flags": flags[1:], "processes": a.processes,
        "devices_per_process": a.devices_per_process,
        "seconds_one_process": t_one, "seconds_multi_process": t_many,
        "report_one_process": {"table": out_one[0].strip()},
        "report_multi_process": {"table": out_many[0].strip(),
                                 "calibration_seconds": meta["report"]["calibration_seconds"],
                                 "quantize_seconds": meta["report"]["quantize_seconds"],
                                 "layers_shared_out": sum(layer["processes"] > 1 for layer in
                                                          meta["report"]["layers"])},
        "arrays": len(x), "arrays_differing": differ,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    from any4_jax import outputs

    outputs.write_json(a.out, rec)
    print(json.dumps({k: rec[k] for k in ("seconds_one_process", "seconds_multi_process",
                                          "arrays", "arrays_differing")}))


if __name__ == "__main__":
    main()
