"""One process of `test_the_library_api_runs_unchanged_under_jax_distributed`: the library
API (`quantize_params` with statistics, `quantize_model` with GPTQ and with AWQ, calibrated on
text; a Mixtral's stacked experts) in a job of $JAX_NUM_PROCESSES processes (or alone), its
results written to OUT/p<process>.npz.

usage: python -m tests.distributed.api_worker HF_DIR MIXTRAL_DIR OUT
"""

import os
import sys

from any4_jax import distributed

if os.environ.get("JAX_NUM_PROCESSES"):
    distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from any4_jax import QuantConfig  # noqa: E402
from any4_jax.loading import load_model  # noqa: E402
from any4_jax.nn import QuantDense, dense_layers  # noqa: E402
from any4_jax.ptq import CalibrationConfig, calibration_tokens, quantize_params  # noqa: E402
from any4_jax.ptq.quantize_model import quantize_model  # noqa: E402


def main(hf_dir: str, moe_dir: str, out: str) -> None:
    cfg = QuantConfig(format="any4", group_size=32)
    rng = np.random.default_rng(0)
    tree = {"model": {"layers": {"0": {"mlp": {
        "up_proj": {"kernel": rng.standard_normal((64, 96)).astype(np.float32)},
        "down_proj": {"kernel": rng.standard_normal((96, 64)).astype(np.float32)}}}}}}
    stats = {"model/layers/0/mlp/up_proj": rng.random(64).astype(np.float32) + 0.1,
             "model/layers/0/mlp/down_proj": rng.random(96).astype(np.float32) + 0.1}
    q = quantize_params(tree, cfg, calibration=stats)
    arrays = {}
    for name, layer in q["model"]["layers"]["0"]["mlp"].items():
        for f in ("codes", "lut", "scales", "zeros"):
            arrays[f"params/{name}/{f}"] = np.asarray(getattr(layer["kernel"], f))
    lm = load_model(hf_dir, param_dtype="float32")
    calib = CalibrationConfig(source="text", num_samples=8, seq_len=32, batch_size=2)
    with open(os.path.join(hf_dir, "text.txt")) as fh:
        tokens = calibration_tokens(lm.tokenizer.encode, calib, fh.read())
    qm, rep = quantize_model(lm.model, cfg, calibration=calib, tokens=tokens, method="gptq",
                             progress=False)
    for path, layer in dense_layers(qm):
        if isinstance(layer, QuantDense):
            for f in ("codes", "lut", "scales", "zeros"):
                arrays[f"gptq/{path}/{f}"] = np.asarray(getattr(layer.qweight, f))
    arrays["processes"] = np.asarray([layer.processes for layer in rep.layers])
    # AWQ: its scale search sees every batch in every process; the rows are shared out
    lm = load_model(hf_dir, param_dtype="float32")
    qm, _ = quantize_model(lm.model, cfg, calibration=calib, tokens=tokens, method="awq",
                           progress=False)
    for path, layer in dense_layers(qm):
        if isinstance(layer, QuantDense):
            arrays[f"awq/{path}/codes"] = np.asarray(layer.qweight.codes)
            arrays[f"awq/{path}/lut"] = np.asarray(layer.qweight.lut)
    # stacked experts: each expert's statistic from the tokens routed to it (the data-parallel
    # batches' per-expert sums); the [E*N, K] matrices are quantized whole in every process
    lm = load_model(moe_dir, param_dtype="float32")
    with open(os.path.join(hf_dir, "text.txt")) as fh:
        tokens = calibration_tokens(lm.tokenizer.encode, calib, fh.read())
    qm, rep = quantize_model(lm.model, cfg, calibration=calib, tokens=tokens, progress=False)
    for path, layer in dense_layers(qm):
        if isinstance(layer, QuantDense):
            arrays[f"moe/{path}/codes"] = np.asarray(layer.qweight.codes)
            arrays[f"moe/{path}/lut"] = np.asarray(layer.qweight.lut)
    arrays["moe_processes"] = np.asarray([layer.processes for layer in rep.layers])
    np.savez(os.path.join(out, f"p{jax.process_index()}.npz"), **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:])
