"""The functional API for users who keep their own params: `quantize_params`.

Works on a plain nested dict in Flax Linen layout (as in Hugging Face Flax checkpoints:
`model/layers/<i>/self_attn/q_proj/kernel` [in, out]); returns a new tree in which each
selected kernel is replaced by a `QuantizedWeight` ([out, in], see docs/design.md s.3). Nothing is
mutated. `model_from_params` runs such a tree through our Llama.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
from flax import nnx
from flax.core import FrozenDict, freeze

from any4_jax.models.llama.config import LlamaConfig
from any4_jax.models.llama.convert_flax import flax_name_to_path
from any4_jax.models.llama.params import abstract_model, assemble
from any4_jax.nn.bcqdense import BCQDense
from any4_jax.nn.layers import dense_layers, set_layer
from any4_jax.nn.qdense import QuantDense
from any4_jax.ptq.awq import AWQConfig
from any4_jax.ptq.calibrate import CalibrationConfig
from any4_jax.ptq.quantize_model import quantize_model
from any4_jax.ptq.rows import quantize_rows
from any4_jax.quant.bcq import BCQWeight
from any4_jax.quant.config import QuantConfig
from any4_jax.quant.gptq import GPTQConfig
from any4_jax.quant.qweight import QuantizedWeight

__all__ = ["Calibration", "default_filter", "model_from_params", "quantize_params"]


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibrate by running the model: `tokens` [n, t] int, `model_config` the LlamaConfig of
    the params, `config` the mode/statistic (sequential by default)."""

    tokens: np.ndarray
    model_config: LlamaConfig
    config: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)


def _root(params) -> Mapping:
    """The Linen tree under an optional top-level "params" key; a TypeError for a non-mapping."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping (a nested dict of arrays in Linen layout, "
                        f"model/layers/<i>/.../kernel), got {type(params).__name__}")
    return params[next(iter(params))] if list(map(str, params)) == ["params"] else params


def _leaves(tree: Mapping, prefix: tuple = ()) -> dict[tuple, object]:
    """{key path as given (any key types): leaf} of a nested mapping (dicts, FrozenDicts)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_leaves(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _rebuild(tree: Mapping, new: dict[tuple, object], prefix: tuple = ()) -> dict:
    """A copy of `tree` as plain dicts with the same keys, its leaves replaced from `new`."""
    return {k: _rebuild(v, new, prefix + (k,)) if isinstance(v, Mapping)
            else new.get(prefix + (k,), v) for k, v in tree.items()}


def _name(keys: tuple) -> str:
    return "/".join(str(k) for k in keys)


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
                    method: str = "rtn", gptq: GPTQConfig | None = None,
                    awq: AWQConfig | None = None, progress: bool = False) -> dict:
    """Returns a new params tree with the selected kernels replaced by `QuantizedWeight`s.

    calibration: None (formats that need no activations, or any-n with
      sample_weighting="none"); a mapping {layer: xbar [K]} keyed by the Linen layer name
      ('model/layers/0/self_attn/q_proj') or our dotted path ('layers.0.self_attn.q_proj');
      or a `Calibration` (tokens + model config) to calibrate by running the model.
    filter: (name, leaf) -> bool on the '/'-joined names of the leaves.
    method, gptq: as `quantize_model`'s; "gptq" and "awq" need a `Calibration` (they run the
      model); with "awq" the tree's RMSNorm weights change too (the scales folded into them).
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}; e.g. "
                        "QuantConfig(**d) for a dict")
    if method != "rtn" and not isinstance(calibration, Calibration):
        raise ValueError(f"method={method!r} needs calibration=Calibration(tokens, "
                         "model_config): it takes each layer's input Hessian from the model")
    root = _root(params)
    keys = {_name(k): k for k in _leaves(root)}  # '/'-joined name -> the keys as given
    flat = {_name(k): v for k, v in _leaves(root).items()}
    names = [n for n, leaf in flat.items() if filter(n, leaf)]
    if not names:
        raise ValueError("the filter selects no kernel; is this a Linen-layout Llama tree "
                         "(model/layers/<i>/.../kernel)?")
    out: dict = {}
    if isinstance(calibration, Calibration):
        model = model_from_params(root, calibration.model_config)
        include = [_dotted(n) for n in names]
        qmodel, _ = quantize_model(model, config, calibration=calibration.config,
                                   tokens=calibration.tokens, include=include, exclude=(),
                                   method=method, gptq=gptq, awq=awq, in_place=True,
                                   progress=progress)
        layers = dict(dense_layers(qmodel))
        for n in names:
            out[n] = layers[_dotted(n)].qweight
        if method == "awq":  # the scales folded into the norms (and unquantized kernels)
            state = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(qmodel))}
            for n, leaf in flat.items():
                path = flax_name_to_path(n)
                if n not in out and path is not None and path in state:
                    out[n] = np.asarray(state[path]).astype(np.asarray(leaf).dtype)
    elif calibration is None or isinstance(calibration, Mapping):
        stats = {}
        for k, v in (calibration or {}).items():
            stats[k if "/" not in k else ".".join(
                str(x) for x in flax_name_to_path(k + "/kernel")[:-1])] = v
        needs = config.uses_activation_stats
        for n in names:
            xbar = stats.get(_dotted(n))
            if needs and xbar is None:
                raise ValueError(
                    f"{n}: {config.format} with sample_weighting={config.sample_weighting!r} "
                    "needs an activation statistic: pass calibration= (statistics or a "
                    "Calibration), or use sample_weighting='none'")
            out[n] = quantize_rows(np.asarray(flat[n]).T, config,
                                   sample_weight=xbar if needs else None, name=n)
    elif calibration is not None and not isinstance(calibration, Mapping):
        raise TypeError(f"calibration must be a Calibration or a mapping of statistics, got "
                        f"{type(calibration).__name__}")
    tree = _rebuild(root, {keys[n]: q for n, q in out.items()})
    if root is not params:
        tree = {next(iter(params)): tree}
    return freeze(tree) if isinstance(params, FrozenDict) else tree


def model_from_params(params: dict, config: LlamaConfig, *, param_dtype=None):
    """Our Llama from a Linen-layout params tree whose kernels may be `QuantizedWeight`s
    (from `quantize_params`): those layers become `QuantDense`."""
    flat = {_name(k): v for k, v in _leaves(_root(params)).items()}
    quantized = {n: v for n, v in flat.items() if isinstance(v, QuantizedWeight | BCQWeight)}
    dense = [(flax_name_to_path(n), np.asarray(v)) for n, v in flat.items()
             if n not in quantized and flax_name_to_path(n) is not None]
    dtype = param_dtype or str(dense[0][1].dtype)
    if config.tie_word_embeddings:
        dense = [(p, a) for p, a in dense if p[0] != "lm_head"]
    model = abstract_model(config, dtype)
    for n, qw in quantized.items():
        p = flax_name_to_path(n)
        if p is None or p[-1] != "kernel":
            raise ValueError(f"a QuantizedWeight sits at {n!r}, which is not a Dense kernel "
                             "of the Llama")
        layer = BCQDense(qw) if isinstance(qw, BCQWeight) else QuantDense(qw)
        set_layer(model, ".".join(str(x) for x in p[:-1]), layer)
    return assemble(config, dense, param_dtype=dtype, source="params", model=model)
