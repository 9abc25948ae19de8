"""The shared kernel test base: one battery of `lut_matmul` tests that every implementation's
test module subclasses (reference, CPU, Pallas interpret/GPU, CUDA), and its helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax.kernels import lut_matmul
from any4_jax.quant import KMeansConfig, QuantConfig, quantize_weight

# ||y - y_ref|| / ||y_ref|| against a float64 product of the same dequantized weight.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}


def make_qweight(rng, n, k, fmt="any4", g=64, dtype=jnp.bfloat16):
    # t-distributed rows with a per-row spread, so scales and zeros vary from group to group
    w = rng.standard_t(4, size=(n, k)) * rng.uniform(0.5, 2.0, size=(n, 1)) * 0.02
    return quantize_weight(jnp.asarray(w, dtype), QuantConfig(format=fmt, group_size=g))


class LutMatmulBase:
    """Subclass per implementation; override `run` to call a backend directly."""

    implementation: str

    def run(self, x, qw):
        return lut_matmul(x, qw, implementation=self.implementation)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
    @pytest.mark.parametrize("m", [1, 3, 16, 33])
    def test_against_float64(self, rng, dtype, m):
        qw = make_qweight(rng, 96, 256, dtype=dtype)
        x = jnp.asarray(rng.standard_normal((m, 256)), dtype)
        y = self.run(x, qw)
        assert y.shape == (m, 96) and y.dtype == dtype
        w64 = np.asarray(qw.dequantize(dtype).astype(jnp.float32), np.float64)
        ref = np.asarray(x.astype(jnp.float32), np.float64) @ w64.T
        err = np.linalg.norm(np.asarray(y.astype(jnp.float32)) - ref) / np.linalg.norm(ref)
        assert err < TOLERANCE[dtype], err

    @pytest.mark.parametrize("fmt", ["int4", "nf4", "fp4", "fp4_e2m1", "any4", "any3", "any2"])
    @pytest.mark.parametrize("g", [32, 64, 128, 256])
    def test_identity_activations_return_the_weight(self, rng, fmt, g):
        qw = make_qweight(rng, 64, 256, fmt=fmt, g=g, dtype=jnp.float32)
        y = self.run(jnp.eye(256, dtype=jnp.float32), qw)  # y[m, n] = w[n, m]
        np.testing.assert_array_equal(np.asarray(y), np.asarray(qw.dequantize()).T)

    def test_integer_table_any4_equals_int4(self, rng):
        w = jnp.asarray(rng.standard_normal((64, 256)), jnp.float32)
        int4 = quantize_weight(w, QuantConfig(format="int4", group_size=64))
        any4 = quantize_weight(w, QuantConfig(format="any4", group_size=64,
                                              kmeans=KMeansConfig(init="int", max_iter=0)))
        x = jnp.asarray(rng.standard_normal((4, 256)), jnp.float32)
        np.testing.assert_array_equal(self.run(x, any4), self.run(x, int4))

    def test_leading_dims_jit_and_vmap(self, rng):
        qw = make_qweight(rng, 32, 128)
        x = jnp.asarray(rng.standard_normal((2, 3, 128)), jnp.bfloat16)
        y = jax.jit(self.run)(x, qw)
        assert y.shape == (2, 3, 32)
        np.testing.assert_array_equal(y[1], self.run(x[1], qw))
        layers = [make_qweight(rng, 32, 128) for _ in range(3)]
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)
        ys = jax.vmap(self.run, in_axes=(None, 0))(x[0], stacked)
        for i, layer in enumerate(layers):
            np.testing.assert_array_equal(ys[i], self.run(x[0], layer))
