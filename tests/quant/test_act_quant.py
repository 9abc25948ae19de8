"""Activation fake-quantization (simulated W4A4): idempotent, per token, errors named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax.quant import ActQuantConfig, QuantConfig
from any4_jax.quant.act_quant import fake_quantize
from any4_jax.quant.bcq import array_scales, normalize
from any4_jax.quant.bcq_fit import fit_codebooks
from any4_jax.quant.bcq_quantize import normalized_blocks


def _acts(seed=0, t=64, k=256):
    """Token rows with per-channel magnitudes spread over a few octaves (outlier channels)."""
    x = jax.random.normal(jax.random.PRNGKey(seed), (t, k))
    return x * jnp.exp(jax.random.normal(jax.random.PRNGKey(seed + 1), (k,)))


@pytest.fixture(scope="module")
def bcq_config():
    xb, _, _, _ = normalized_blocks(_acts(5, t=256), QuantConfig(format="bcq"))
    r = fit_codebooks(xb, n_codebooks=8, pin_range=True)
    return ActQuantConfig(kind="bcq", codebooks=r.codebooks)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_bcq_fake_quant_is_idempotent(bcq_config, dtype):
    x = _acts().astype(dtype)
    q = fake_quantize(x, bcq_config)
    assert q.dtype == dtype and q.shape == x.shape
    assert np.array_equal(np.asarray(fake_quantize(q, bcq_config)), np.asarray(q))
    assert not np.array_equal(np.asarray(q), np.asarray(x))


def test_int4_fake_quant_is_idempotent():
    cfg = ActQuantConfig(kind="int4", group_size=64)
    for dtype in (jnp.bfloat16, jnp.float16):  # exactly
        q = fake_quantize(_acts().astype(dtype), cfg)
        assert np.array_equal(np.asarray(fake_quantize(q, cfg)), np.asarray(q))
    # float32: a group's scale, recomputed from its rounded levels, moves by a few ulps of its
    # range (the levels stay the same)
    q = np.asarray(fake_quantize(_acts(), cfg))
    span = np.ptp(q.reshape(-1, 64), axis=1).repeat(64).reshape(q.shape)
    assert np.all(np.abs(np.asarray(fake_quantize(q, cfg)) - q) <= 8 * 2.0**-23 * span)
    # 16 levels per group of 64
    g = np.asarray(q).reshape(-1, 64)
    assert max(len(np.unique(r)) for r in g) <= 16


def test_bcq_values_lie_on_the_grid_and_each_row_stands_alone(bcq_config):
    x = _acts(2)
    q = fake_quantize(x, bcq_config)
    e, ts = array_scales(q, 64, 31, per_row=True)
    vals = np.asarray(normalize(q, e, ts, 64)).reshape(-1, 8)  # [blocks, 8]
    cb = np.asarray(bcq_config.codebooks)
    # every block's values are entries of one codebook
    assert all(any(np.isin(b, c).all() for c in cb) for b in vals)
    # the largest |x| of each array is stored as +-qmax
    assert np.allclose(np.abs(vals.reshape(-1, 64)).max(1), 31)
    # a row's result does not depend on the other rows
    np.testing.assert_array_equal(fake_quantize(x[3:4], bcq_config), q[3:4])
    np.testing.assert_array_equal(fake_quantize(x.reshape(4, 16, 256), bcq_config),
                                  np.asarray(q).reshape(4, 16, 256))


def test_bcq_error_is_below_int4_at_the_same_group(bcq_config):
    x = _acts(3, t=128)
    rel = lambda c: float(jnp.mean((fake_quantize(x, c) - x) ** 2) / jnp.mean(x ** 2))
    assert rel(bcq_config) < 0.6 * rel(ActQuantConfig(kind="int4", group_size=64))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="needs codebooks"):
        ActQuantConfig(kind="bcq")
    with pytest.raises(ValueError, match="unknown kind"):
        ActQuantConfig(kind="fp4")
    with pytest.raises(ValueError, match="must hold -31 and 31"):
        ActQuantConfig(kind="bcq", codebooks=np.tile(np.arange(-8, 8), (4, 1)))
    with pytest.raises(ValueError, match="not a multiple of 64"):
        fake_quantize(jnp.ones((2, 96)), ActQuantConfig(kind="int4"))
    cfg = ActQuantConfig(kind="int4", group_size=32)
    assert ActQuantConfig.from_dict(cfg.to_dict()) == cfg
