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
    x = jnp.ones((2, 128), jnp.bfloat16)
    np.testing.assert_array_equal(lut_matmul(x, qw), lut_matmul(x, qw, implementation="xla"))


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
