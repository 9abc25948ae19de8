"""nf4 / fp4 bit for bit against bitsandbytes (its CPU path; a test oracle, not a dependency)."""

import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import QuantConfig, quantize_weight
from any4_jax.quant.formats import FIXED_TABLES
from any4_jax.quant.qweight import unpack_codes

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")


def _bnb(w_t, fmt, g):
    quant = F.quantize_nf4 if fmt == "nf4" else F.quantize_fp4
    deq = F.dequantize_nf4 if fmt == "nf4" else F.dequantize_fp4
    packed, state = quant(w_t, blocksize=g)
    out = deq(packed, state)
    p = packed.reshape(-1).numpy()
    codes = np.stack([p >> 4, p & 0xF], axis=-1).reshape(w_t.shape)  # bnb: high nibble first
    return codes.astype(int), state.absmax.numpy().reshape(w_t.shape[0], -1), out


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_tables_are_bitsandbytes_tables(fmt):
    np.testing.assert_array_equal(FIXED_TABLES[fmt], F.get_4bit_type(fmt, device="cpu").numpy())


@pytest.mark.parametrize("g", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_bit_for_bit(fmt, dtype, g):
    gen = torch.Generator().manual_seed(g)
    w_t = (torch.randn(64, 512, generator=gen) * 0.05).to(getattr(torch, dtype))
    w_t[3, 10:20] = 0.0  # exact zeros sit on the +0 / -0 tie of fp4
    w_t[5, :g] = 0.0  # an all-zero block (absmax 0)
    codes, absmax, out = _bnb(w_t, fmt, g)
    w = jnp.asarray(w_t.float().numpy()).astype(dtype)

    # Stored in float32 (bitsandbytes keeps absmax in float32): identical dequantized bits.
    qw = quantize_weight(w, QuantConfig(format=fmt, group_size=g, dtype="float32"))
    np.testing.assert_array_equal(np.asarray(unpack_codes(qw.codes)), codes)
    np.testing.assert_array_equal(np.asarray(qw.scales), absmax)
    ours = np.asarray(qw.dequantize(dtype).astype(jnp.float32))
    np.testing.assert_array_equal(ours, out.float().numpy())

    # Stored in the model dtype: the same codes; only the rounding of absmax differs.
    qw16 = quantize_weight(w, QuantConfig(format=fmt, group_size=g))
    np.testing.assert_array_equal(np.asarray(unpack_codes(qw16.codes)), codes)
