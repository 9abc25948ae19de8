"""`QuantDense`: the NNX layer that holds a `QuantizedWeight` and calls `lut_matmul`.

It takes the place of a model's Dense layer (`x [..., K] -> [..., N]`) with no change to the
model code. The four arrays are `QuantState` variables (not `Param`s: they are not trained),
the format metadata static attributes.

A layer holds its weight in the canonical layout (what checkpoints store) or, after
`prepare("cuda")` / `nn.prepare_model(model)`, in the CUDA kernel's layout, converted once at
load time instead of on every call; `qweight` always gives the canonical form back.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from any4_jax.kernels.api import can_use, lut_matmul, pick, prepare
from any4_jax.kernels.cuda_layout import CudaWeight
from any4_jax.quant.act_quant import ActQuantConfig, fake_quantize
from any4_jax.quant.qweight import QuantizedWeight, WeightMeta


class QuantState(nnx.Variable):
    """An array of a quantized weight (codes, lut, scales or zeros)."""


class QuantDense(nnx.Module):
    """y = lut_matmul(x, qweight) (+ bias): float32 accumulation, y in x's dtype.

    `act_quant` (an ActQuantConfig, static) fake-quantizes x first: simulated W4A4.

    `implementation` is the layer's preference: it runs wherever it takes the input, and an
    input it declines (a prefill above a kernel's row threshold, say) gets the automatic choice.
    """

    def __init__(self, qweight: QuantizedWeight, bias=None, *, implementation: str | None = None,
                 act_quant: ActQuantConfig | None = None):
        qweight.check()
        self.act_quant = act_quant  # static: simulated activation quantization (W4A4)
        self.tp = None  # static: tensor-parallel split (`nn.sharding.shard_model`)
        self.meta: WeightMeta = qweight.meta  # static: format, group size, shape, dtype
        self.table_dtype = str(jnp.dtype(qweight.lut.dtype))
        self._store(qweight)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
        self.implementation = implementation

    # the weight's description, read off its metadata (one copy: `meta`)
    out_features = property(lambda self: self.meta.shape[0])
    in_features = property(lambda self: self.meta.shape[1])
    format = property(lambda self: self.meta.format)
    n_bit = property(lambda self: self.meta.n_bit)
    group_size = property(lambda self: self.meta.group_size)
    symmetric = property(lambda self: self.meta.symmetric)
    weight_dtype = property(lambda self: self.meta.dtype)

    def _store(self, w: QuantizedWeight | CudaWeight) -> None:
        self.codes = QuantState(w.codes)
        self.lut = QuantState(w.lut)
        self.scales = QuantState(w.scales)
        self.zeros = QuantState(w.zeros)
        self.layout = "cuda" if isinstance(w, CudaWeight) else "canonical"

    @property
    def weight(self) -> QuantizedWeight | CudaWeight:
        """The weight as stored: what `lut_matmul` reads."""
        arrays = dict(codes=self.codes[...], lut=self.lut[...], scales=self.scales[...],
                      zeros=self.zeros[...])
        if self.layout == "canonical":
            return QuantizedWeight.from_meta(self.meta, **arrays)
        return CudaWeight(**arrays, meta=self.meta, table_dtype=self.table_dtype)

    @property
    def qweight(self) -> QuantizedWeight:
        """The canonical QuantizedWeight (converted back if the layer is prepared)."""
        w = self.weight
        return w.canonical() if isinstance(w, CudaWeight) else w

    def prepare(self, implementation: str | None) -> None:
        """Stores the weight in the layout `implementation` reads ("cuda": the CUDA kernel's;
        anything else: canonical), converted once here rather than in every call."""
        self._store(prepare(self.weight, implementation))

    def __call__(self, x, *, out_dtype=None):
        """out_dtype: None = x's dtype; float32 for logits (x is promoted first)."""
        if out_dtype is not None and jnp.dtype(out_dtype) != x.dtype:
            x = x.astype(jnp.promote_types(x.dtype, out_dtype))
        if self.act_quant is not None:
            x = fake_quantize(x, self.act_quant)
        w = self.weight
        impl = self.implementation
        if impl is not None and can_use(impl, x, w):
            impl = None  # declined for this input (e.g. too many rows): the automatic choice
        if getattr(self, "tp", None) is not None:
            from any4_jax.nn.sharding import tp_matmul

            y = tp_matmul(x, w, self.tp, impl)
        else:
            y = lut_matmul(x, w, implementation=impl)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y if out_dtype is None else y.astype(out_dtype)

    @staticmethod
    def apply_shared(layers, x) -> list:
        """[layer(x) for layer in layers], bit for bit; layers that share an input, K, group
        size and tables' dtype and run the CPU kernel for it (`prepare_model(model, "cpu")`)
        go through one kernel call (a decode step's q/k/v and gate/up projections: 7 calls a
        layer become 4; docs/cpu_kernel_notes.md, v8); layers with no preference share it
        when the automatic choice is the CPU kernel."""
        if len(layers) > 1 and all(_cpu_shareable(layer, x) for layer in layers):
            qws = [layer.weight for layer in layers]
            if len({(q.shape[1], q.group_size, q.lut.dtype) for q in qws}) == 1:
                from any4_jax.kernels.cpu import lut_matmul_cpu_many

                ys = lut_matmul_cpu_many(x, qws)
                return [y if layer.bias is None else y + layer.bias[...].astype(y.dtype)
                        for y, layer in zip(ys, layers, strict=True)]
        return [layer(x) for layer in layers]

    def checkpoint_meta(self) -> dict:
        """What `placeholder` needs to rebuild this layer's shapes (for checkpoint restore)."""
        m = self.meta
        return {"format": m.format, "n_bit": m.n_bit, "group_size": m.group_size,
                "symmetric": m.symmetric, "shape": list(m.shape), "dtype": m.dtype,
                "table_dtype": self.table_dtype, "bias": self.bias is not None,
                **self._act_meta()}

    def _act_meta(self) -> dict:
        return {} if self.act_quant is None else {"act_quant": self.act_quant.to_dict()}

    @classmethod
    def placeholder(cls, meta: dict) -> QuantDense:
        """A layer of the right shapes and dtypes filled with zeros (restore target); stacked
        experts (`num_experts` in the metadata) get a `QuantExpertDense`."""
        if meta.get("num_experts") and cls is QuantDense:
            from any4_jax.nn.qexperts import QuantExpertDense

            return QuantExpertDense.placeholder(meta)
        if meta.get("format") == "bcq" and cls is QuantDense:
            from any4_jax.nn.bcqdense import BCQDense

            return BCQDense.placeholder(meta)
        n, k = meta["shape"]
        g = meta["group_size"]
        tdt = jnp.dtype(meta["table_dtype"])
        qw = QuantizedWeight(
            codes=jnp.zeros((n, k // 2), jnp.uint8), lut=jnp.zeros((n, 16), tdt),
            scales=jnp.zeros((n, k // g), tdt), zeros=jnp.zeros((n, k // g), tdt),
            format=meta["format"], n_bit=int(meta["n_bit"]), group_size=int(g),
            symmetric=bool(meta["symmetric"]), shape=(int(n), int(k)), dtype=meta["dtype"])
        return cls(qw, np.zeros((n,), tdt) if meta.get("bias") else None,
                   act_quant=act_quant_from_meta(meta))


def _cpu_shareable(layer, x) -> bool:
    """Whether `layer(x)` would run the CPU kernel on its canonical weight as it is (its
    preference, or the automatic choice)."""
    if not (type(layer) is QuantDense and layer.implementation in ("cpu", None)
            and layer.layout == "canonical" and layer.act_quant is None
            and getattr(layer, "tp", None) is None):
        return False
    w = layer.weight
    if layer.implementation is None:
        return pick(x, w) == "cpu"
    return not can_use("cpu", x, w)


def act_quant_from_meta(meta: dict) -> ActQuantConfig | None:
    a = meta.get("act_quant")
    return None if a is None else ActQuantConfig.from_dict(a)
