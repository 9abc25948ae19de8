"""The functional API for users who keep their own params: `quantize_params`.

Works on a plain nested dict in Flax Linen layout (as in Hugging Face Flax checkpoints:
`model/layers/<i>/self_attn/q_proj/kernel` [in, out]); returns a new tree in which each
selected kernel is replaced by a `QuantizedWeight` ([out, in], see DESIGN.md s.3). Nothing is
mutated. `model_from_params` runs such a tree through our Llama.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from any4_jax.models.llama.config import LlamaConfig
from any4_jax.models.llama.convert_flax import (
    flatten,
    flax_name_to_path,
    model_from_params,
    unflatten,
)
from any4_jax.quant.calibrate import CalibrationConfig, dense_layers
from any4_jax.quant.config import QuantConfig
from any4_jax.quant.model_quant import quantize_model
from any4_jax.quant.quantize import quantize_weight

__all__ = ["Calibration", "default_filter", "model_from_params", "quantize_params"]


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibrate by running the model: `tokens` [n, t] int, `model_config` the LlamaConfig of
    the params, `config` the mode/statistic (sequential by default)."""

    tokens: np.ndarray
    model_config: LlamaConfig
    config: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)


def default_filter(name: str, leaf) -> bool:
    """Every 2-D decoder kernel (q, k, v, o, gate, up, down); lm_head and embeddings not."""
    return (name.startswith("model/layers/") and name.endswith("/kernel")
            and getattr(leaf, "ndim", 0) == 2)


def _dotted(name: str) -> str:
    """'model/layers/0/self_attn/q_proj/kernel' -> 'layers.0.self_attn.q_proj'."""
    p = flax_name_to_path(name)
    if p is None:
        raise ValueError(f"{name!r} is not a Llama Dense kernel")
    return ".".join(str(x) for x in p[:-1])


def quantize_params(params: Mapping, config: QuantConfig | None = None, *,
                    calibration: Calibration | Mapping | None = None,
                    filter: Callable[[str, object], bool] = default_filter,  # noqa: A002
                    progress: bool = False) -> dict:
    """Returns a new params tree with the selected kernels replaced by `QuantizedWeight`s.

    calibration: None (formats that need no activations, or any-n with
      sample_weighting="none"); a mapping {layer: xbar [K]} keyed by the Linen layer name
      ('model/layers/0/self_attn/q_proj') or our dotted path ('layers.0.self_attn.q_proj');
      or a `Calibration` (tokens + model config) to calibrate by running the model.
    filter: (name, leaf) -> bool on the '/'-joined names of the leaves.
    """
    config = config or QuantConfig()
    root = params["params"] if set(params) == {"params"} else params
    flat = flatten(dict(root))
    names = [n for n, leaf in flat.items() if filter(n, leaf)]
    if not names:
        raise ValueError("the filter selects no kernel; is this a Linen-layout Llama tree "
                         "(model/layers/<i>/.../kernel)?")
    out = dict(flat)
    if isinstance(calibration, Calibration):
        model = model_from_params(root, calibration.model_config)
        include = [_dotted(n) for n in names]
        qmodel, _ = quantize_model(model, config, calibration=calibration.config,
                                   tokens=calibration.tokens, include=include, exclude=(),
                                   in_place=True,
                                   progress=progress)
        layers = dict(dense_layers(qmodel))
        for n in names:
            out[n] = layers[_dotted(n)].qweight
    else:
        stats = {}
        for k, v in (calibration or {}).items():
            stats[k if "/" not in k else ".".join(
                str(x) for x in flax_name_to_path(k + "/kernel")[:-1])] = v
        needs = config.spec.family == "any" and config.sample_weighting != "none"
        for n in names:
            xbar = stats.get(_dotted(n))
            if needs and xbar is None:
                raise ValueError(
                    f"{n}: any-n with sample_weighting={config.sample_weighting!r} needs an "
                    "activation statistic: pass calibration= (statistics or a Calibration), "
                    "or use sample_weighting='none'")
            out[n] = quantize_weight(np.asarray(flat[n]).T, config,
                                     sample_weight=xbar if needs else None, name=n)
    tree = unflatten(out)
    return {"params": tree} if root is not params else tree
