"""AWQ (Lin et al., 2023): per-input-channel scales searched on the calibration activations
and folded into the preceding operation, so that the float model is unchanged and the
quantized layers see `W * s` (docs/design.md s.4, "AWQ").

For a group of layers that read one input X [T, K] (q/k/v; gate/up; down; o when v feeds it
channel for channel), with xbar = mean_t |X| and s = xbar^alpha normalised to
sqrt(max s * min s) = 1, alpha is searched over a grid in [0, 1] to minimise
sum over the group of ||X W^T - X (Q(W s) / s)^T||^2, Q the layer's own quantization (any
format; any-n gets the scaled input's statistic xbar / s as its sample weights). Then 1/s is
folded into what produces X: the RMSNorm weight before q/k/v and before gate/up, the rows of
up_proj before down_proj, the rows of v_proj before o_proj (only without grouped-query
attention: with it a v channel feeds several o channels, which would need one shared scale),
and W becomes W * s. Alpha = 0 (s = 1) is in the grid, so the search never does worse than
round to nearest on the calibration activations. Stacked experts are left as they are.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from any4_jax.nn.layers import get_layer, num_experts
from any4_jax.ptq.calibrate import _tapped_forward
from any4_jax.quant.config import QuantConfig
from any4_jax.quant.quantize import quantize_weight

# (what produces the input: kind, path within the block; the layers that read it). The
# Llama-family block (models/llama/modules.py); groups whose layers are absent are skipped.
GROUPS = (
    ("norm", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("rows", "self_attn.v_proj", ("self_attn.o_proj",)),
    ("norm", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("rows", "mlp.up_proj", ("mlp.down_proj",)),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQConfig:
    """grid: alphas searched, i / grid for i in 0..grid-1. max_tokens: calibration rows used
    in the search (the first ones), which bounds its memory and time."""

    grid: int = 20
    max_tokens: int = 4096

    def __post_init__(self):
        for f in ("grid", "max_tokens"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"AWQConfig.{f}={v!r} must be a positive integer")


@dataclasses.dataclass
class GroupScale:
    layers: tuple[str, ...]
    alpha: float
    error: float  # the chosen scales' output error
    rtn_error: float  # alpha = 0


@partial(jax.jit, static_argnums=(0, 4))
def _inputs(graphdef, state, x, extras, taps: tuple[str, ...]):
    _, sink = _tapped_forward(graphdef, state, x, extras, taps)
    return {k: v for k, v, _, _ in sink}


def block_inputs(block, batches, taps, max_tokens: int) -> dict[str, np.ndarray]:
    """{tap: its input rows [<= max_tokens, K] float32} from the block's forward on each
    (x, extras) of `batches`."""
    graphdef, state = nnx.split(block)
    out: dict[str, list] = {}
    for x, extras in batches:
        for k, v in _inputs(graphdef, state, x, extras, tuple(taps)).items():
            out.setdefault(k, []).append(np.asarray(v, np.float32))
    return {k: np.concatenate(v)[:max_tokens] for k, v in out.items()}


def _output_error(x, w, wq) -> float:
    d = jnp.asarray(x) @ (jnp.asarray(w) - jnp.asarray(wq)).T
    return float(jnp.sum(d * d))


def search_scales(x, weights: list, cfgs: list[QuantConfig], config: AWQConfig):
    """x: [T, K], weights: the group's [N, K] float weights -> (s [K], alpha, error, error at
    alpha = 0)."""
    xbar = np.abs(x).mean(0).astype(np.float64) + 1e-8
    best = None
    rtn_err = None
    for i in range(config.grid):
        alpha = i / config.grid
        s = xbar ** alpha
        s = s / np.sqrt(s.max() * s.min())
        err = 0.0
        for w, c in zip(weights, cfgs, strict=True):
            ws = (np.asarray(w, np.float32) * s[None, :]).astype(np.float32)
            sw = (xbar / s) if c.spec.family == "any" and c.sample_weighting != "none" else None
            q = quantize_weight(jnp.asarray(ws, w.dtype), c, sample_weight=sw)
            err += _output_error(x, np.asarray(w, np.float32),
                                 np.asarray(q.dequantize(jnp.float32)) / s[None, :])
        if i == 0:
            rtn_err = err
        if best is None or err < best[2]:
            best = (s.astype(np.float32), alpha, err)
    return (*best, rtn_err)


def _replace(layer, name: str, fn) -> None:
    """layer.<name> = a new Variable holding fn(old value): a new object, so a model that
    shares this layer's Variables (quantize_model's copy shares its input's) is untouched."""
    var = getattr(layer, name)
    old = var[...]
    setattr(layer, name, type(var)(fn(old.astype(jnp.float32)).astype(old.dtype)))


def _scale_producer(block, kind: str, path: str, inv) -> None:
    """Multiply what produces the group's input by `inv` (= 1/s) along its output channels."""
    layer = get_layer(block, path)
    if kind == "norm":
        _replace(layer, "weight", lambda w: w * inv)
    else:  # a Dense [in, out]: its output channels are the columns of the kernel
        _replace(layer, "kernel", lambda k: k * inv[None, :])


def apply_awq(block, batches, paths: list[str], cfgs: dict[str, QuantConfig],
              config: AWQConfig, *, mha: bool) -> list[GroupScale]:
    """Searches and folds the scales of every group of `block` whose layers are all in
    `paths` (relative dotted paths), in place. `batches`: [(x, extras)] of the block's input.
    `mha`: no grouped-query attention (v_proj may scale into o_proj)."""
    wanted = set(paths)
    groups = [(kind, prod, layers) for kind, prod, layers in GROUPS
              if all(p in wanted for p in layers) and (mha or prod != "self_attn.v_proj")
              and not any(num_experts(get_layer(block, p)) for p in layers)]
    if not groups:
        return []
    # every group's input from the float block before any folding: folding is exact, so
    # the inputs the search sees are those the scaled model computes, up to 1/s
    xs = block_inputs(block, batches, [layers[0] for _, _, layers in groups],
                      config.max_tokens)
    out = []
    for kind, prod, layers in groups:
        x = xs[layers[0]]
        ws = [get_layer(block, p).kernel[...].T for p in layers]
        s, alpha, err, rtn = search_scales(x, ws, [cfgs[p] for p in layers], config)
        if alpha > 0:
            _scale_producer(block, kind, prod, jnp.asarray(1.0 / s))
            for p in layers:
                _replace(get_layer(block, p), "kernel", lambda k, s=s: k * s[:, None])
        out.append(GroupScale(tuple(layers), alpha, err, rtn))
    return out
