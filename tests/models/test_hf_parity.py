"""Our Flax Llama vs transformers (torch, float32) on random tiny checkpoints.

Tolerance: float32 logits agree to 2e-5 absolute (logit scale ~1-3; measured ~5e-7): the
two implementations differ only in summation order.
"""

import json
import os

import numpy as np
import pytest

from any4_jax.models.llama.convert_hf import load_hf_model
from any4_jax.models.llama.modules import ATTN_BLOCK
from any4_jax.models.llama.safetensors_io import CheckpointError, SafetensorsFile
from tests.models.hf_tiny import VOCAB, tiny_hf_model, torch_logits

pytest.importorskip("torch")
pytest.importorskip("transformers")

ATOL = 2e-5


def _save(model, path, **kw):
    model.save_pretrained(path, **kw)
    return str(path)


def _read_cfg(path):
    with open(os.path.join(path, "config.json")) as fh:
        return json.load(fh)


def _write_cfg(path, cfg):
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)


def _ids(b, t, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (b, t)).astype(np.int32)


@pytest.mark.parametrize("kind, kw", [
    ("llama", {}),
    ("llama", {"tied": True}),
    ("llama", {"rope_scaling": True}),
    ("mistral", {"sliding_window": 48}),
])
@pytest.mark.parametrize("t", [37, ATTN_BLOCK + 45])  # dense and blocked attention paths
def test_logits_match_transformers(tmp_path, kind, kw, t):
    hf = tiny_hf_model(kind, **kw)
    ours, cfg = load_hf_model(_save(hf, tmp_path))
    assert cfg.tie_word_embeddings == kw.get("tied", False)
    assert (cfg.rope_scaling is not None) == kw.get("rope_scaling", False)
    assert cfg.sliding_window == kw.get("sliding_window")
    ids = _ids(2, t)
    ref = torch_logits(hf, ids)
    got, _ = ours(ids)
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.asarray(got), ref, atol=ATOL, rtol=0)


def test_sharded_checkpoint_streams_every_shard(tmp_path):
    hf = tiny_hf_model("llama")
    path = _save(hf, tmp_path, max_shard_size="100KB")
    shards = [f for f in os.listdir(path) if f.startswith("model-")]
    assert len(shards) > 2 and os.path.isfile(os.path.join(path,
                                                           "model.safetensors.index.json"))
    ours, _ = load_hf_model(path)
    ids = _ids(1, 20)
    np.testing.assert_allclose(np.asarray(ours(ids)[0]), torch_logits(hf, ids), atol=ATOL)


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    import torch

    hf = tiny_hf_model("llama").to(torch.bfloat16)
    ours, _ = load_hf_model(_save(hf, tmp_path))
    assert ours.dtype == np.dtype("bfloat16")
    ref = torch_logits(hf.float(), _ids(1, 16))
    got = np.asarray(ours(_ids(1, 16))[0])
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_missing_shard_is_named(tmp_path):
    path = _save(tiny_hf_model("llama"), tmp_path, max_shard_size="100KB")
    victim = sorted(f for f in os.listdir(path) if f.startswith("model-"))[1]
    os.remove(os.path.join(path, victim))
    with pytest.raises(CheckpointError, match=victim):
        load_hf_model(path)


def test_wrong_shape_is_named(tmp_path):
    path = _save(tiny_hf_model("llama"), tmp_path)
    _write_cfg(path, {**_read_cfg(path), "intermediate_size": 128})
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.kernel has shape"):
        load_hf_model(path)


def test_truncated_file_is_reported(tmp_path):
    path = _save(tiny_hf_model("llama"), tmp_path)
    f = os.path.join(path, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf_model(path)


def test_corrupt_header_is_reported(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes((40).to_bytes(8, "little") + b"{not json" + b" " * 31)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        SafetensorsFile(f)


def test_missing_files_and_architecture(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_model(tmp_path)
    path = _save(tiny_hf_model("llama"), tmp_path / "m")
    cfg = _read_cfg(path)
    _write_cfg(path, {**cfg, "model_type": "gpt_neox"})
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_hf_model(path)
    _write_cfg(path, cfg)
    os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="convert to safetensors"):
        load_hf_model(path)


def test_missing_tensor_is_named(tmp_path):
    from any4_jax.models.llama.safetensors_io import write_safetensors

    path = _save(tiny_hf_model("llama"), tmp_path)
    f = os.path.join(path, "model.safetensors")
    st = SafetensorsFile(f)
    kept = {k: np.array(st.get(k)) for k in st if "layers.1.mlp.up_proj" not in k}
    st.close()
    write_safetensors(f, kept)
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.kernel"):
        load_hf_model(path)
