"""QuantizedWeight: packing, the invariant, and pytree behaviour under jit / vmap / sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from any4_jax.quant import QuantConfig, QuantizedWeight, pack_codes, quantize_weight, row_mesh
from any4_jax.quant.qweight import unpack_codes


def test_pack_nibble_order():
    packed = pack_codes(jnp.array([[1, 2, 15, 0]]))
    assert packed.dtype == jnp.uint8
    np.testing.assert_array_equal(packed, [[0x21, 0x0F]])  # element 2j in the low nibble


def test_pack_unpack_round_trip(rng):
    codes = rng.integers(0, 16, size=(3, 5, 64)).astype(np.uint8)
    packed = pack_codes(jnp.asarray(codes))
    assert packed.shape == (3, 5, 32)
    np.testing.assert_array_equal(unpack_codes(packed), codes)


def test_pack_rejects_odd_length():
    with pytest.raises(ValueError, match="even"):
        pack_codes(jnp.zeros((2, 3), jnp.int32))


def _qw(rng, n=16, k=128, fmt="int4", g=32):
    w = rng.standard_normal((n, k)).astype(np.float32)
    return quantize_weight(w, QuantConfig(format=fmt, group_size=g)), w


def test_dequantize_matches_the_formula(rng):
    qw, _ = _qw(rng, fmt="any4")
    codes = np.asarray(unpack_codes(qw.codes)).astype(int)
    lut, s, z = (np.asarray(a, np.float32) for a in (qw.lut, qw.scales, qw.zeros))
    n, k = qw.shape
    g = qw.group_size
    want = np.empty((n, k), np.float32)
    for i in range(n):
        for j in range(k):
            want[i, j] = lut[i, codes[i, j]] * s[i, j // g] + z[i, j // g]
    np.testing.assert_allclose(qw.dequantize(), want, rtol=1e-6, atol=1e-7)


def test_check_names_the_bad_field(rng):
    qw, _ = _qw(rng)
    bad = QuantizedWeight(codes=qw.codes[:, :-1], lut=qw.lut, scales=qw.scales, zeros=qw.zeros,
                          format=qw.format, n_bit=4, group_size=qw.group_size, symmetric=False,
                          shape=qw.shape, dtype=qw.dtype)
    with pytest.raises(ValueError, match=r"codes has shape \(16, 63\), expected \(16, 64\)"):
        bad.check()


def test_pytree_leaves_and_names(rng):
    qw, _ = _qw(rng)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(qw)[0]]
    assert paths == [".codes", ".lut", ".scales", ".zeros"]
    leaves, treedef = jax.tree_util.tree_flatten(qw)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.format == "int4" and again.shape == qw.shape


def test_jit_dequantize_and_pass_through(rng):
    qw, _ = _qw(rng)
    out = jax.jit(lambda q: q)(qw)
    assert isinstance(out, QuantizedWeight) and out.group_size == qw.group_size
    np.testing.assert_array_equal(jax.jit(lambda q: q.dequantize())(qw), qw.dequantize())


def test_vmap_over_a_stack_of_layers(rng):
    layers = [_qw(rng)[0] for _ in range(3)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)
    assert stacked.codes.shape == (3, 16, 64)
    stacked.check()
    deq = jax.vmap(lambda q: q.dequantize())(stacked)
    for i, layer in enumerate(layers):
        np.testing.assert_array_equal(deq[i], layer.dequantize())
    # dequantize also handles the leading dim directly
    np.testing.assert_array_equal(stacked.dequantize(), deq)


def test_sharded_over_rows(rng):
    qw, _ = _qw(rng, n=64)
    mesh = row_mesh()
    assert mesh.size == 8, "conftest should provide 8 CPU devices"
    sharded = jax.device_put(qw, NamedSharding(mesh, PartitionSpec("rows")))
    assert len(sharded.codes.sharding.device_set) == 8
    np.testing.assert_array_equal(jax.jit(lambda q: q.dequantize())(sharded), qw.dequantize())


def test_bits_per_weight(rng):
    qw, _ = _qw(rng, n=8, k=4096, g=128, fmt="any4")
    # 4 code bits + (scale + zero) / 128 * 32 bits + 16 * 32 / 4096 bits of table (float32)
    assert qw.bits_per_weight() == pytest.approx(4 + 64 / 128 + 512 / 4096)
