"""Capacity plan for multi-process quantization of Llama-3-70B and Llama-3.1-405B.

    python scripts/capacity_plan.py [--models Llama-3-70B,Llama-3.1-405B] [--devices 8,16,32,64]
                                    [--group-size 128] [--out benchmarks/results/capacity_plan.json]

Shapes come from `jax.eval_shape` of the model (no memory is allocated). Per device, for
`any4 quantize --distributed` (docs/distributed.md): the quantized rows it ends up holding
(codes + bf16 table, scales, zeros of its share of every layer), the largest transient (its
rows of the largest matrix in bf16 on its process's first device, plus a share of one chunk's
k-means working set), and the
unquantized tensors every process holds whole (embedding, lm_head, norms). For evaluation of
the result with its parameters sharded over the devices: the quantized layers' share plus the
replicated unquantized tensors. Time: the linear layers' weights divided by the devices and by
a measured rate in weights per second per device (the whole-model run on an H200,
`model_quant_llama3-8b_nvidia_h200.json`, and one matrix on an H100, `quantize_nvidia_h100_80gb
_hbm3.json`): a first-order extrapolation (k-means per row costs about K log K, so wide rows
cost a little more per weight than the measured 4096- and 14336-wide ones). Reading: each
process reads its share of the linear weights plus the unquantized tensors at --read-gbps;
this, not k-means, dominates at scale.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

KMEANS_BYTES_PER_ELEMENT = 40  # quant/quantize.py: the working set of one chunk
GPU_CHUNK_ELEMENTS = 1 << 25


def _dense_shapes(cfg):
    """[(path, N, K)] of every decoder Dense and the other arrays' bytes (bf16)."""
    import jax.numpy as jnp
    from flax import nnx

    from any4_jax.models.llama.params import abstract_model
    from any4_jax.nn.layers import dense_layers
    from any4_jax.ptq.quantize_model import select_layers

    model = abstract_model(cfg, jnp.bfloat16)  # nnx.eval_shape: shapes only
    paths = set(select_layers(model))
    dense = [(p, int(layer.kernel.shape[1]), int(layer.kernel.shape[0]))
             for p, layer in dense_layers(model) if p in paths]
    _, state = nnx.split(model)
    total = sum(math.prod(v.get_value().shape) * 2 for _, v in nnx.to_flat_state(state))
    quant_dense = sum(n * k * 2 for _, n, k in dense)
    return dense, total - quant_dense


def _rate(path: Path, kind: str) -> float | None:
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    if kind == "model":  # linear weights of Llama-3-8B over the whole-model seconds
        from any4_jax.models.llama.config import LLAMA3_8B

        dense, _ = _dense_shapes(LLAMA3_8B)
        return sum(n * k for _, n, k in dense) / d["quantize_seconds"]
    r = max(d["results"], key=lambda r: int(r["shape"].split("x")[0]) *
            int(r["shape"].split("x")[1]))
    n, k = (int(v) for v in r["shape"].split("x"))
    return n * k / r["ours_warm_s"]


def plan(cfg, devices: list[int], g: int, rates: dict, per_process: int = 8,
         read_gbps: float = 2.0) -> dict:
    dense, other = _dense_shapes(cfg)
    weights = sum(n * k for _, n, k in dense)
    qbytes = sum(n * k // 2 + (n * 16 + 2 * n * (k // g)) * 2 for _, n, k in dense)
    largest = max(n * k for _, n, k in dense)
    rows = []
    for d in devices:
        procs = max(1, d // per_process)
        # a process's rows of the largest matrix land on its first device, then one chunk's
        # k-means working set is split over its devices
        transient = largest * 2 / procs + min(largest / procs, GPU_CHUNK_ELEMENTS) * \
            KMEANS_BYTES_PER_ELEMENT / min(d, per_process)
        row = {"devices": d,
               "quantize_gb_per_device": (qbytes / d + other + transient) / 1e9,
               "eval_gb_per_device": (qbytes / d + other) / 1e9}
        for name, rate in rates.items():
            if rate:
                row[f"quantize_minutes_{name}"] = weights / (d * rate) / 60
        # each process reads its rows and the unquantized tensors whole
        row["read_minutes"] = (weights * 2 / procs + other) / (read_gbps * 1e9) / 60
        rows.append(row)
    return {"model": cfg.name, "params": cfg.num_params(), "linear_weights": weights,
            "quantized_bytes": qbytes, "bf16_bytes": cfg.num_params() * 2,
            "unquantized_bytes": other, "largest_matrix": largest, "group_size": g,
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="Llama-3-70B,Llama-3.1-405B")
    ap.add_argument("--devices", default="8,16,32,64")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--devices-per-process", type=int, default=8,
                    help="GPUs per host process (8: one process per 8-GPU node)")
    ap.add_argument("--read-gbps", type=float, default=2.0,
                    help="GB/s one process reads its safetensors rows at (2.0: a fast NVMe or "
                    "network filesystem per node)")
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--out", default="benchmarks/results/capacity_plan.json")
    args = ap.parse_args()

    from any4_jax import outputs
    from any4_jax.models.llama.config import PRESETS

    res = Path(args.results)
    rates = {"h200_model": _rate(res / "model_quant_llama3-8b_nvidia_h200.json", "model"),
             "h100_matrix": _rate(res / "quantize_nvidia_h100_80gb_hbm3.json", "matrix")}
    devices = [int(v) for v in args.devices.split(",")]
    out = {"rates_weights_per_second": rates, "plans": []}
    for name in args.models.split(","):
        if name not in PRESETS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(PRESETS)}")
        p = plan(PRESETS[name], devices, args.group_size, rates, args.devices_per_process,
                 args.read_gbps)
        out["plans"].append(p)
        print(f"\n{name}: {p['params'] / 1e9:.1f}B parameters, bf16 {p['bf16_bytes'] / 1e9:.0f} "
              f"GB; any4 g{args.group_size} layers {p['quantized_bytes'] / 1e9:.1f} GB, "
              f"unquantized arrays {p['unquantized_bytes'] / 1e9:.1f} GB (every process)")
        cols = [k for k in p["rows"][0] if k != "devices"]
        print("| devices | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for r in p["rows"]:
            print(f"| {r['devices']} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")
    outputs.write_json(args.out, out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
