"""QuantDense: a layer computes x times its dequantized weight."""

import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax.nn.qdense import QuantDense
from any4_jax.ptq.calibrate import (
    CalibrationConfig,
    calibration_tokens,
)
from any4_jax.ptq.quantize_model import quantize_model
from any4_jax.quant.config import QuantConfig
from tests.tiny_lm import byte_tokenizer, tiny_model

ANY4 = QuantConfig(format="any4", group_size=32)


@pytest.fixture(scope="module")
def tokens():
    return calibration_tokens(byte_tokenizer().encode, CalibrationConfig())


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
