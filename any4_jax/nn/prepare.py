"""`prepare_model`: every QuantDense of a model in the layout its kernel reads, once."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from any4_jax.kernels.api import can_use, pick
from any4_jax.nn.layers import dense_layers
from any4_jax.nn.qdense import QuantDense


def prepare_model(model, implementation: str | None = None, *, dtype=None) -> dict[str, str]:
    """Puts every QuantDense of `model` in the layout its kernel reads, in place, once.

    implementation None: the CUDA layout for each layer `lut_matmul(implementation=None)` would
    run with the CUDA kernel for `dtype` activations (default: the model's dtype), i.e. on a
    GPU with the library built; canonical for the rest, which keep choosing at call time.
    "xla" / "pallas" / "cuda" / "cpu": every layer that implementation takes runs it (in its
    layout); a layer it declines keeps choosing at call time; a ValueError with the reasons if
    it takes none. Returns {layer path: layout}.
    """
    dtype = jnp.dtype(dtype or getattr(model, "dtype", jnp.float32))
    # stacked experts stay canonical (each call slices one expert's rows): not prepared
    layers = [(p, m) for p, m in dense_layers(model) if type(m) is QuantDense]
    plan, first_reasons = {}, None
    for path, layer in layers:
        probe = jax.ShapeDtypeStruct((1, layer.in_features), dtype)
        if implementation is None:
            plan[path] = ("cuda" if pick(probe, layer.weight) == "cuda" else "xla", None)
        else:
            reasons = can_use(implementation, probe, layer.weight)
            first_reasons = first_reasons or reasons
            plan[path] = ("xla", None) if reasons else (implementation, implementation)
    if implementation is not None and layers and all(i is None for _, i in plan.values()):
        raise ValueError(f"prepare_model(implementation={implementation!r}): it takes none of "
                         "the layers: " + "; ".join(first_reasons))
    out = {}
    for path, layer in dense_layers(model):  # stacked experts: the preference only
        if isinstance(layer, QuantDense) and type(layer) is not QuantDense:
            layer.implementation = implementation
            out[path] = layer.layout
    for path, layer in layers:
        layout, impl = plan[path]
        layer.prepare(layout)
        layer.implementation = impl
        out[path] = layer.layout
    return out
