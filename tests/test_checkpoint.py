"""Quantized checkpoints: bit-exact round trips, atomic writes, validated loading."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import checkpoint as ck
from any4_jax import outputs
from any4_jax.eval.perplexity import perplexity
from any4_jax.loading import load_model
from tests.tiny_lm import quantized_tiny, tiny_model


@pytest.fixture(scope="module")
def quantized():
    return quantized_tiny("nf4")


def test_round_trip_is_bit_exact(quantized, tmp_path):
    qm, tok = quantized
    path = ck.save_quantized(tmp_path / "ck", qm, tokenizer=tok, metadata={"note": "t"})
    assert sorted(os.listdir(path)) == ["any4.json", "state", "tokenizer"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    lm = load_model(path)  # format detected from the files
    assert lm.format == "any4"
    ids = np.asarray(tok.encode("It is a truth universally acknowledged. " * 12), np.int32)
    a = perplexity(qm, ids, seq_len=64, progress=False)
    b = perplexity(lm.model, ids, seq_len=64, progress=False)
    assert a.window_nll == b.window_nll  # bit for bit
    assert lm.model.layers[1].mlp.down_proj.format == "nf4"
    assert lm.tokenizer.encode("héllo") == tok.encode("héllo")
    meta = ck.read_metadata(path)
    assert meta["run"] == {"note": "t"} and meta["versions"]["jax"]
    assert len(meta["quantized_layers"]) == 14


def test_interrupted_save_leaves_nothing_that_looks_complete(quantized, tmp_path,
                                                            monkeypatch):
    qm, tok = quantized

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.json, "dump", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.save_quantized(tmp_path / "ck", qm, tokenizer=tok, metadata={})
    assert os.listdir(tmp_path) == []


def test_existing_directory_needs_overwrite(quantized, tmp_path):
    qm, tok = quantized
    ck.save_quantized(tmp_path / "ck", qm, tokenizer=tok, metadata={"v": 1})
    with pytest.raises(FileExistsError, match="overwrite"):
        ck.save_quantized(tmp_path / "ck", qm, tokenizer=tok, metadata={"v": 2})
    ck.save_quantized(tmp_path / "ck", qm, tokenizer=tok, metadata={"v": 2}, overwrite=True)
    assert ck.read_metadata(tmp_path / "ck")["run"] == {"v": 2}
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def _edit_meta(path, fn, *, rechecksum=True):
    """Edits any4.json; with rechecksum, as a writer would (the checksum made anew), so the
    loader's consistency checks are what is tested."""
    f = os.path.join(path, "any4.json")
    with open(f) as fh:
        meta = json.load(fh)
    fn(meta)
    if rechecksum:
        meta["checksum"] = outputs.json_checksum(meta)
    with open(f, "w") as fh:
        json.dump(meta, fh)


def test_a_hand_edited_metadata_file_or_a_damaged_array_file_is_named(quantized, tmp_path):
    qm, tok = quantized
    path = str(ck.save_quantized(tmp_path / "ck", qm, tokenizer=tok, metadata={}))
    _edit_meta(path, lambda m: m["run"].update(note="edited"), rechecksum=False)
    with pytest.raises(ck.CheckpointFormatError, match="any4.json was edited or damaged"):
        ck.load_quantized(path)
    _edit_meta(path, lambda m: m["run"].pop("note"), rechecksum=False)  # as written again
    meta = ck.read_metadata(path)
    victim = next(f for f in meta["files"] if f.startswith("state/") and "/d/" in f)
    with open(os.path.join(path, victim), "r+b") as fh:
        fh.seek(10)
        fh.write(b"\xff\x00\xff")
    with pytest.raises(ck.CheckpointFormatError, match=f"{victim} is damaged"):
        ck.load_quantized(path)


def test_loading_names_what_is_wrong(quantized, tmp_path):
    qm, tok = quantized
    path = str(ck.save_quantized(tmp_path / "ck", qm, tokenizer=tok, metadata={}))
    _edit_meta(path, lambda m: m.update(format_version=99))
    with pytest.raises(ck.CheckpointFormatError, match="format_version 99"):
        ck.load_quantized(path)
    _edit_meta(path, lambda m: m.update(format_version=ck.FORMAT_VERSION))
    _edit_meta(path, lambda m: m["quantized_layers"]["layers.0.mlp.up_proj"].update(
        group_size=64))
    with pytest.raises(ck.CheckpointFormatError, match=r"layers/0/mlp/up_proj/scales: stored"):
        ck.load_quantized(path)
    os.remove(os.path.join(path, "any4.json"))
    with pytest.raises(ck.CheckpointFormatError, match="interrupted save"):
        ck.read_metadata(path)


def test_missing_state_directory(quantized, tmp_path):
    import shutil

    qm, tok = quantized
    path = str(ck.save_quantized(tmp_path / "ck", qm, tokenizer=tok, metadata={}))
    shutil.rmtree(os.path.join(path, "state"))
    with pytest.raises(ck.CheckpointFormatError, match="state/ directory is missing"):
        ck.load_quantized(path)


def test_sizes(quantized):
    from any4_jax.ptq.quantize_model import model_bytes

    qm, _ = quantized
    b = model_bytes(qm)
    dense = model_bytes(tiny_model())
    # tiny layers (K=64, float32 tables) carry a large table overhead; still under half
    assert 0 < b["quantized"] < 0.5 * (dense["other"] - b["other"])
    assert jnp.dtype(qm.dtype) == jnp.float32
