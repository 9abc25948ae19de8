"""Post-training quantization of whole models: calibration, `quantize_model`, and the
functional `quantize_params` / `model_from_params` for users who keep their own params."""

from any4_jax.ptq.calibrate import CalibrationConfig, calibration_tokens
from any4_jax.ptq.functional import Calibration, model_from_params, quantize_params
from any4_jax.ptq.quantize_model import QuantReport, model_bytes, quantize_model, select_layers

__all__ = ["Calibration", "CalibrationConfig", "QuantReport", "calibration_tokens",
           "model_bytes", "model_from_params", "quantize_model", "quantize_params",
           "select_layers"]
