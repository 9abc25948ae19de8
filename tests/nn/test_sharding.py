"""Tensor-parallel evaluation: a quantized model sharded over 4 devices (column-parallel
q/k/v/gate/up, row-parallel o/down) gives the one-device perplexity within float32
tolerance, with each shard's lut_matmul run inside shard_map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax.eval.perplexity import perplexity
from any4_jax.nn import dense_layers
from any4_jax.nn.sharding import shard_model, tp_mesh
from any4_jax.ptq.quantize_model import quantize_model
from any4_jax.quant import QuantConfig
from tests.tiny_lm import byte_tokenizer, tiny_model

TEXT = "It is a truth universally acknowledged, that a single man in possession. " * 8


@pytest.mark.parametrize("impl", ["xla", "cpu"])
def test_sharded_perplexity_equals_one_device(impl, tmp_path):
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (tests force 8 host devices)")
    qm, _ = quantize_model(tiny_model(), QuantConfig(format="any4", group_size=16,
                                                     sample_weighting="none"), progress=False)
    for _, layer in dense_layers(qm):
        if hasattr(layer, "implementation"):
            layer.implementation = impl
    ids = np.asarray(byte_tokenizer().encode(TEXT), np.int32)
    ref = perplexity(qm, ids, seq_len=64, progress=False)
    mesh = tp_mesh(jax.devices()[:4])
    plan = shard_model(qm, mesh)
    assert plan["layers.0.self_attn.q_proj"] == "column"
    assert plan["layers.0.self_attn.k_proj"] == "column"
    assert plan["layers.0.self_attn.o_proj"] == "row"
    assert plan["layers.1.mlp.down_proj"] == "row"
    q = qm.layers[0].self_attn.q_proj
    assert q.codes[...].sharding.spec == jax.sharding.PartitionSpec("tp")
    assert len(q.codes[...].sharding.device_set) == 4
    got = perplexity(qm, ids, seq_len=64, progress=False)
    np.testing.assert_allclose(got.window_nll, ref.window_nll, rtol=2e-6)
    # the matmul runs per shard: a manual (shard_map) computation, holding the kernel
    hlo = jax.jit(lambda a: q(a)).lower(jnp.ones((2, 64), jnp.float32)).as_text()
    assert "manual_computation" in hlo
    if impl == "cpu":
        assert "custom_call @any4_lut_gemm_cpu" in hlo


def test_a_checkpoint_restores_straight_into_shards(tmp_path):
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (tests force 8 host devices)")
    from any4_jax import checkpoint as ck

    qm, _ = quantize_model(tiny_model(), QuantConfig(format="any4", group_size=16,
                                                     sample_weighting="none"), progress=False)
    tok = byte_tokenizer()
    path = ck.save_quantized(tmp_path / "ck", qm, tokenizer=tok, metadata={})
    ids = np.asarray(tok.encode(TEXT), np.int32)
    ref = perplexity(qm, ids, seq_len=64, progress=False)
    mesh = tp_mesh(jax.devices()[:4])
    model, *_ = ck.load_quantized(path, mesh=mesh)
    q, o = model.layers[0].self_attn.q_proj, model.layers[0].self_attn.o_proj
    assert q.tp.kind == "column" and o.tp.kind == "row"
    assert q.codes[...].sharding.spec == jax.sharding.PartitionSpec("tp")
    assert o.codes[...].sharding.spec == jax.sharding.PartitionSpec(None, "tp")
    assert o.lut[...].sharding.spec == jax.sharding.PartitionSpec()
    # each device holds its shard only
    assert {s.data.shape for s in q.codes[...].addressable_shards} == {(16, 32)}
    got = perplexity(model, ids, seq_len=64, progress=False)
    np.testing.assert_allclose(got.window_nll, ref.window_nll, rtol=2e-6)
