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
    qw = make_qweight(rng, 32, 128)
    x3 = jnp.ones((3, 128), jnp.bfloat16)
    np.testing.assert_array_equal(lut_matmul(x3, qw), lut_matmul(x3, qw, implementation="xla"))
    # one or two bf16 rows: on a CPU the default is the CPU kernel, which post-scales them (the
    # weight is not rounded to bf16 before the product): equal within bf16's rounding
    x2 = jnp.ones((2, 128), jnp.bfloat16)
    y, ref = (np.asarray(a, np.float32) for a in (lut_matmul(x2, qw),
                                                  lut_matmul(x2, qw, implementation="xla")))
    np.testing.assert_allclose(y, ref, rtol=1e-2, atol=1e-2)


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
