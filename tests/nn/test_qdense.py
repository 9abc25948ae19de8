"""QuantDense: the layer computes x times its dequantized weight, derives its description from
the weight's metadata, rebuilds itself from checkpoint metadata, and converts between layouts
without losing a bit."""

import jax.numpy as jnp
import numpy as np

from any4_jax.kernels import CudaWeight
from any4_jax.nn.qdense import QuantDense
from any4_jax.ptq.quantize_model import quantize_model
from any4_jax.quant.config import QuantConfig
from tests.kernels.base import make_qweight
from tests.tiny_lm import tiny_model


def test_quant_dense_computes_x_times_dequantized_weight(rng):
    m = tiny_model()
    qm, _ = quantize_model(m, QuantConfig(format="nf4", group_size=32), progress=False)
    layer = qm.layers[1].mlp.down_proj
    assert isinstance(layer, QuantDense)
    x = jnp.asarray(rng.standard_normal((3, 5, layer.in_features)), jnp.float32)
    ref = jnp.einsum("btk,nk->btn", x, layer.qweight.dequantize(jnp.float32),
                     precision="highest")
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert layer(x, out_dtype=jnp.float32).dtype == jnp.float32


def test_description_is_the_weights_metadata(rng):
    qw = make_qweight(rng, 48, 128, fmt="int4", g=32, dtype=jnp.bfloat16)
    layer = QuantDense(qw)
    assert layer.meta == qw.meta
    assert (layer.out_features, layer.in_features) == (48, 128)
    assert (layer.format, layer.n_bit, layer.group_size, layer.symmetric) == ("int4", 4, 32,
                                                                              False)
    assert layer.weight_dtype == "bfloat16" and layer.table_dtype == "bfloat16"


def test_placeholder_rebuilds_the_shapes_from_checkpoint_metadata(rng):
    qw = make_qweight(rng, 32, 64, fmt="any4", g=32, dtype=jnp.float16)
    layer = QuantDense(qw, bias=np.ones(32, np.float16))
    meta = layer.checkpoint_meta()
    assert meta == {"format": "any4", "n_bit": 4, "group_size": 32, "symmetric": False,
                    "shape": [32, 64], "dtype": "float16", "table_dtype": "float16",
                    "bias": True}
    empty = QuantDense.placeholder(meta)
    assert empty.meta == layer.meta
    for name in ("codes", "lut", "scales", "zeros"):
        a, b = getattr(empty, name)[...], getattr(layer, name)[...]
        assert a.shape == b.shape and a.dtype == b.dtype
    assert empty.bias is not None and empty.bias[...].shape == (32,)


def test_cuda_layout_round_trip_is_bit_exact(rng):
    qw = make_qweight(rng, 32, 128, fmt="any4", g=64, dtype=jnp.bfloat16)
    layer = QuantDense(qw)
    layer.prepare("cuda")
    assert layer.layout == "cuda" and isinstance(layer.weight, CudaWeight)
    assert layer.weight.meta == qw.meta
    back = layer.qweight
    for name in ("codes", "lut", "scales", "zeros"):
        np.testing.assert_array_equal(np.asarray(getattr(back, name)),
                                      np.asarray(getattr(qw, name)))
    layer.prepare(None)
    assert layer.layout == "canonical"
    x = jnp.asarray(rng.standard_normal((2, 128)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(QuantDense(qw)(x)))
