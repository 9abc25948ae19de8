"""Per-layer error analysis of quantization formats: a table, JSON and PNG plots.

For each selected layer and format: relative weight error ||W - W_hat|| / ||W|| and relative
output error ||X W^T - X W_hat^T|| / ||X W^T|| on the layer's actual calibration inputs X
(every layer quantized alone on the unquantized model, so the columns compare formats, not
error accumulation). Plots: output error per layer per format, and for one chosen row the
histogram of its group-scaled weights with the any4 table against the int4 and nf4 levels.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from any4_jax.nn.layers import get_layer
from any4_jax.ptq.calibrate import collect_inputs
from any4_jax.quant import scaling
from any4_jax.quant.config import QuantConfig
from any4_jax.quant.formats import NF4_TABLE
from any4_jax.quant.quantize import quantize_weight


@dataclasses.dataclass
class LayerError:
    path: str
    format: str
    weight_rel_error: float
    output_rel_error: float
    bits_per_weight: float


def analyze(model, tokens: np.ndarray, paths: list[str], formats: list[str], *,
            group_size: int | None, statistic: str = "abs_of_mean", progress: bool = True):
    """Returns (list[LayerError], {path: {format: QuantizedWeight}} for the plots)."""
    inputs = collect_inputs(model, tokens, paths)
    results, qws = [], {}
    for p in tqdm(paths, desc="analyzing", unit="layer", disable=not progress):
        w = jnp.asarray(get_layer(model, p).kernel[...], jnp.float32).T  # [N, K]
        x = jnp.asarray(inputs[p])
        stat = jnp.abs(x.mean(0)) if statistic == "abs_of_mean" else jnp.abs(x).mean(0)
        y = x @ w.T
        qws[p] = {}
        for f in formats:
            q = quantize_weight(w, QuantConfig(format=f, group_size=group_size),
                                sample_weight=stat, name=p)
            wq = q.dequantize(jnp.float32)
            results.append(LayerError(
                p, f, float(jnp.linalg.norm(wq - w) / jnp.linalg.norm(w)),
                float(jnp.linalg.norm(x @ wq.T - y) / jnp.linalg.norm(y)),
                q.bits_per_weight()))
            qws[p][f] = q
    return results, qws


def summary_table(results: list[LayerError], formats: list[str]) -> str:
    lines = ["| format | bits/weight | weight rel. error (mean) | output rel. error (mean) | "
             "output rel. error (max) | worst layer |", "|---|---|---|---|---|---|"]
    for f in formats:
        rs = [r for r in results if r.format == f]
        worst = max(rs, key=lambda r: r.output_rel_error)
        lines.append(f"| {f} | {np.mean([r.bits_per_weight for r in rs]):.3f} | "
                     f"{np.mean([r.weight_rel_error for r in rs]):.4f} | "
                     f"{np.mean([r.output_rel_error for r in rs]):.4f} | "
                     f"{worst.output_rel_error:.4f} | {worst.path} |")
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend. Imported here, not at the top:
    matplotlib is slow to import and only the plots need it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_errors(results: list[LayerError], formats: list[str], path: str) -> str:
    plt = _pyplot()

    layers = list(dict.fromkeys(r.path for r in results))
    fig, ax = plt.subplots(figsize=(max(8, len(layers) * 0.06), 4.5))
    for f in formats:
        err = {r.path: r.output_rel_error for r in results if r.format == f}
        ax.plot(range(len(layers)), [err[p] for p in layers], marker=".", lw=1, label=f)
    ax.set_xlabel("layer (block by block)")
    ax.set_ylabel("relative output error")
    ax.set_yscale("log")
    ax.set_title("Output error on calibration activations, per layer")
    step = max(1, len(layers) // 20)
    ax.set_xticks(range(0, len(layers), step),
                  [layers[i].replace("layers.", "").replace("self_attn.", "")
                   .replace("mlp.", "") for i in range(0, len(layers), step)],
                  rotation=60, ha="right", fontsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_row_histogram(model, layer_path: str, row: int, qw_any, path: str, *,
                       group_size: int | None) -> str:
    """Histogram of one row's group-scaled weights (units of the 4-bit grid, [0, 15]) with the
    row's any4 table, the int4 grid and the nf4 table mapped onto the same range."""
    plt = _pyplot()

    w = np.asarray(get_layer(model, layer_path).kernel[...], np.float32).T[row]
    g = group_size or w.shape[0]
    _, _, ws = scaling.asymmetric(jnp.asarray(w[None, :]), g, 4)  # the quantizer's own rule
    ws = np.asarray(ws).ravel()
    table = np.asarray(qw_any.lut[row], np.float32) + 8  # stored entries are c - 2^(n-1)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.hist(ws, bins=120, color="0.75", label=f"{layer_path} row {row} (group-scaled)")
    for i, (vals, color, name) in enumerate([
            (table, "C3", "any4 table (learned)"), (np.arange(16.0), "C0", "int4 grid"),
            ((np.asarray(NF4_TABLE) + 1) * 7.5, "C2", "nf4 levels (mapped)")]):
        for j, v in enumerate(vals):
            ax.axvline(v, color=color, lw=1.2, ymax=1 - 0.1 * i,
                       label=name if j == 0 else None, alpha=0.8)
    ax.set_xlabel("value in units of the group's step (0 = group min, 15 = group max)")
    ax.set_ylabel("weights")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(results, formats, out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    return {"errors_png": plot_errors(results, formats, os.path.join(out_dir,
                                                                     "layer_errors.png"))}
