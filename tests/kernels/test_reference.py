"""The reference implementation ("xla") through the shared battery, and `lut_matmul`'s
dispatch and reasons."""

import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax.kernels import can_use, lut_matmul
from tests.kernels.base import LutMatmulBase, make_qweight


class TestXla(LutMatmulBase):
    implementation = "xla"


def test_default_picks_a_usable_implementation(rng):
    """On a CPU the default is the CPU kernel, which post-scales one or two bf16 rows, and
    every bf16 call with bf16 tables where the CPU has AVX512_BF16 (the weight is not rounded
    to bf16 before the product): equal to the reference within bf16's rounding."""
    qw = make_qweight(rng, 32, 128)
    for m in (1, 2, 3):
        x = jnp.ones((m, 128), jnp.bfloat16)
        y, ref = (np.asarray(a, np.float32) for a in (lut_matmul(x, qw),
                                                      lut_matmul(x, qw, implementation="xla")))
        np.testing.assert_allclose(y, ref, rtol=1e-2, atol=1e-2)
    # float32 keeps the reference's weights: only the order of the sum differs
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
    q32 = make_qweight(rng, 32, 128, dtype=jnp.float32)
    np.testing.assert_allclose(lut_matmul(x, q32), lut_matmul(x, q32, implementation="xla"),
                               rtol=1e-5, atol=1e-5)


def test_reasons_are_words(rng):
    qw = make_qweight(rng, 32, 128)
    assert can_use("xla", jnp.ones((2, 128), jnp.bfloat16), qw) == []
    reasons = can_use("xla", jnp.ones((2, 64), jnp.int32), qw)
    assert any("last dim must be K=128" in r for r in reasons)
    assert any("int32 is not one of" in r for r in reasons)
    assert any("unknown implementation 'triton'" in r
               for r in can_use("triton", jnp.ones((2, 128)), qw))
    with pytest.raises(ValueError, match="cannot run: x has shape"):
        lut_matmul(jnp.ones((2, 64), jnp.bfloat16), qw)
