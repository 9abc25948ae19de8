"""`QuantDense`: the NNX layer that holds a `QuantizedWeight` and calls `lut_matmul`.

It takes the place of a model's Dense layer (`x [..., K] -> [..., N]`) with no change to the
model code. The four arrays are `QuantState` variables (not `Param`s: they are not trained),
the format metadata static attributes.

A layer holds its weight in the canonical layout (what checkpoints store) or, after
`prepare("cuda")` / `prepare_model(model)`, in the CUDA kernel's layout, converted once at
load time instead of on every call; `qweight` always gives the canonical form back.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from any4_jax.kernels.api import can_use, lut_matmul
from any4_jax.kernels.cuda_layout import CudaWeight
from any4_jax.quant.qweight import QuantizedWeight


class QuantState(nnx.Variable):
    """An array of a quantized weight (codes, lut, scales or zeros)."""


class QuantDense(nnx.Module):
    """y = lut_matmul(x, qweight) (+ bias): float32 accumulation, y in x's dtype.

    `implementation` is the layer's preference: it runs wherever it takes the input, and an
    input it declines (a prefill above a kernel's row threshold, say) gets the automatic choice.
    """

    def __init__(self, qweight: QuantizedWeight, bias=None, *, implementation: str | None = None):
        qweight.check()
        self.out_features, self.in_features = qweight.shape
        self.format, self.n_bit = qweight.format, qweight.n_bit
        self.group_size, self.symmetric = qweight.group_size, qweight.symmetric
        self.weight_dtype = qweight.dtype
        self.table_dtype = str(jnp.dtype(qweight.lut.dtype))
        self._store(qweight)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
        self.implementation = implementation

    def _store(self, w: QuantizedWeight | CudaWeight) -> None:
        self.codes = QuantState(w.codes)
        self.lut = QuantState(w.lut)
        self.scales = QuantState(w.scales)
        self.zeros = QuantState(w.zeros)
        self.layout = "cuda" if isinstance(w, CudaWeight) else "canonical"
        self.int_offset = w.int_offset if isinstance(w, CudaWeight) else -1

    @property
    def weight(self) -> QuantizedWeight | CudaWeight:
        """The weight as stored: what `lut_matmul` reads."""
        if self.layout == "canonical":
            return QuantizedWeight(
                codes=self.codes[...], lut=self.lut[...], scales=self.scales[...],
                zeros=self.zeros[...], format=self.format, n_bit=self.n_bit,
                group_size=self.group_size, symmetric=self.symmetric,
                shape=(self.out_features, self.in_features), dtype=self.weight_dtype)
        return CudaWeight(codes=self.codes[...], lut=self.lut[...], scales=self.scales[...],
                          zeros=self.zeros[...], shape=(self.out_features, self.in_features),
                          group_size=self.group_size, int_offset=self.int_offset,
                          format=self.format, n_bit=self.n_bit, symmetric=self.symmetric,
                          dtype=self.weight_dtype, table_dtype=self.table_dtype)

    @property
    def qweight(self) -> QuantizedWeight:
        """The canonical QuantizedWeight (converted back if the layer is prepared)."""
        w = self.weight
        return w.canonical() if isinstance(w, CudaWeight) else w

    def prepare(self, implementation: str | None) -> None:
        """Stores the weight in the layout `implementation` reads ("cuda": the CUDA kernel's;
        anything else: canonical), converted once here rather than in every call."""
        from any4_jax.kernels.api import prepare

        self._store(prepare(self.weight, implementation))

    def __call__(self, x, *, out_dtype=None):
        """out_dtype: None = x's dtype; float32 for logits (x is promoted first)."""
        if out_dtype is not None and jnp.dtype(out_dtype) != x.dtype:
            x = x.astype(jnp.promote_types(x.dtype, out_dtype))
        w = self.weight
        impl = self.implementation
        if impl is not None and can_use(impl, x, w):
            impl = None  # declined for this input (e.g. too many rows): the automatic choice
        y = lut_matmul(x, w, implementation=impl)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y if out_dtype is None else y.astype(out_dtype)

    def meta(self) -> dict:
        """What `placeholder` needs to rebuild this layer's shapes (for checkpoint restore)."""
        return {"format": self.format, "n_bit": self.n_bit, "group_size": self.group_size,
                "symmetric": self.symmetric, "shape": [self.out_features, self.in_features],
                "dtype": self.weight_dtype, "table_dtype": self.table_dtype,
                "bias": self.bias is not None}

    @classmethod
    def placeholder(cls, meta: dict) -> QuantDense:
        """A layer of the right shapes and dtypes filled with zeros (restore target)."""
        n, k = meta["shape"]
        g = meta["group_size"]
        tdt = jnp.dtype(meta["table_dtype"])
        qw = QuantizedWeight(
            codes=jnp.zeros((n, k // 2), jnp.uint8), lut=jnp.zeros((n, 16), tdt),
            scales=jnp.zeros((n, k // g), tdt), zeros=jnp.zeros((n, k // g), tdt),
            format=meta["format"], n_bit=int(meta["n_bit"]), group_size=int(g),
            symmetric=bool(meta["symmetric"]), shape=(int(n), int(k)), dtype=meta["dtype"])
        return cls(qw, np.zeros((n,), tdt) if meta.get("bias") else None)


def prepare_model(model, implementation: str | None = None, *, dtype=None) -> dict[str, str]:
    """Puts every QuantDense of `model` in the layout its kernel reads, in place, once.

    implementation None: the CUDA layout for each layer `lut_matmul(implementation=None)` would
    run with the CUDA kernel for `dtype` activations (default: the model's dtype), i.e. on a
    GPU with the library built; canonical for the rest, which keep choosing at call time.
    "xla" / "pallas" / "cuda": every layer that implementation takes runs it (in its layout);
    a layer it declines keeps choosing at call time; a ValueError with the reasons if it takes
    none. Returns {layer path: layout}.
    """
    import jax

    from any4_jax.kernels.api import can_use, pick
    from any4_jax.quant.calibrate import dense_layers

    dtype = jnp.dtype(dtype or getattr(model, "dtype", jnp.float32))
    layers = [(p, m) for p, m in dense_layers(model) if isinstance(m, QuantDense)]
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
    for path, layer in layers:
        layout, impl = plan[path]
        layer.prepare(layout)
        layer.implementation = impl
        out[path] = layer.layout
    return out
