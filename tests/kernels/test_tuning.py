"""The Pallas tuning table (entries as the tuner records them) and `PallasConfig`."""

import jax.numpy as jnp

from any4_jax.kernels import tuning
from any4_jax.kernels.pallas_gpu import lut_matmul_pallas
from any4_jax.kernels.reference import lut_matmul_reference
from tests.kernels.base import make_qweight


def test_entries_set_the_config_and_their_timings_are_ignored(rng, monkeypatch):
    entry = {"bm": 16, "bn": 32, "bk": 64, "num_warps": 8, "num_stages": 2, "lookup": "gather",
             "post_scale": True, "split_k": 2, "us": 12.5, "reference_us": 40.0,
             "variants_us": {"select": 20.0, "gather": 14.0, "gather+post": 12.5}}
    monkeypatch.setattr(tuning, "_table", lambda: {"64x512:g128:m16": entry,
                                                  "64x512:g32:m16": entry,
                                                  "64x512:dense_threshold": 96})
    cfg = tuning.block_config(m=3, n=64, k=512, g=128)
    assert cfg == tuning.PallasConfig(**{c: entry[c] for c in tuning.FIELDS})
    assert tuning.dense_threshold(n=64, k=512) == 96
    # an entry whose K block does not divide the group size falls back to the rule
    assert tuning.block_config(m=3, n=64, k=512, g=32) == tuning.default_config(
        m=3, n=64, k=512, g=32)
    # and the kernel runs with what the table says
    qw = make_qweight(rng, 64, 512, g=128)
    x = jnp.asarray(rng.standard_normal((3, 512)), jnp.bfloat16)
    y = lut_matmul_pallas(x, qw, interpret=True).astype(jnp.float32)
    ref = lut_matmul_reference(x, qw).astype(jnp.float32)
    assert float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)) < 2e-2


def test_rule_of_thumb_takes_the_cheapest_lookup_without_extra_bytes():
    cfg = tuning.default_config(m=1, n=28672, k=4096, g=128)
    assert cfg.lookup == "gather" and cfg.post_scale is True
    assert set(cfg.to_dict()) == set(tuning.FIELDS)


def test_config_problems_are_named():
    cfg = tuning.PallasConfig(bm=16, bn=48, bk=128, split_k=8)
    assert cfg.problems(n=32, k=256, g=64) == [
        "bn=48 does not divide N=32",
        "bk=128 does not divide the group size 64 (one scale per block)",
        "split_k=8: each split must cover whole groups, K=256 is not a multiple of split_k x "
        "group_size = 512"]
    assert tuning.PallasConfig(bm=16, bn=32, bk=64).problems(n=32, k=256, g=64) == []
