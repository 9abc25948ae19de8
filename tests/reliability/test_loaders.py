"""Bad inputs to the model loaders (Hugging Face safetensors, HF Flax msgpack, GGUF): each is a
`CheckpointError` that names the file or tensor and says what to do, raised before any tensor
is converted where the headers can tell, and the input files are left as they were.

The checkpoints are the tiny random model of tests/models/hf_tiny.py, written with
save_pretrained / write_flax_checkpoint / write_safetensors, and a tiny GGUF written with the
`gguf` package.
"""

import hashlib
import json
import os

import gguf
import ml_dtypes
import numpy as np
import pytest

from any4_jax.models.llama import convert_flax, convert_gguf, convert_hf
from any4_jax.models.llama.convert_flax import load_flax_model
from any4_jax.models.llama.convert_gguf import load_gguf_model
from any4_jax.models.llama.convert_hf import load_hf_model
from any4_jax.models.llama.safetensors_io import (
    CheckpointError,
    SafetensorsFile,
    write_safetensors,
)
from any4_jax.models.llama.tokenizer import hf_tokenizer
from tests.models.hf_tiny import VOCAB, tiny_hf_model, write_flax_checkpoint

pytest.importorskip("torch")

LAYERS = 2  # tiny_hf_model's num_hidden_layers


# ---------------------------------------------------------------- helpers


def snapshot(root) -> dict:
    """{relative path: (size, mtime_ns, sha256)} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, digest)
    return out


def expect_error(call, root, phrase, exc=CheckpointError):
    """`call()` raises `exc` whose message matches `phrase`; root's files are unchanged."""
    before = snapshot(root)
    with pytest.raises(exc, match=phrase) as info:
        call()
    assert snapshot(root) == before
    return str(info.value)


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Any tensor read or conversion fails the test: the error must come from the headers."""
    def boom(*a, **k):
        raise AssertionError("a tensor was read or converted before the check")

    def arm():
        monkeypatch.setattr(SafetensorsFile, "get", boom)
        monkeypatch.setattr(convert_hf, "assemble", boom)
        monkeypatch.setattr(convert_flax, "assemble", boom)
        monkeypatch.setattr(convert_gguf, "assemble", boom)
        monkeypatch.setattr(convert_gguf.gguf.quants, "dequantize", boom)
    return arm


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("llama")


@pytest.fixture(scope="module")
def state(hf) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}


def hf_dir(hf, root, tensors=None, **save) -> str:
    """save_pretrained into root; `tensors` replaces model.safetensors' contents."""
    hf.save_pretrained(root, **save)
    if tensors is not None:
        write_safetensors(os.path.join(root, "model.safetensors"), tensors)
    return str(root)


def layer(state, i, j) -> dict[str, np.ndarray]:
    """Layer i's tensors renamed to layer j."""
    pre = f"model.layers.{i}."
    return {f"model.layers.{j}." + k[len(pre):]: v for k, v in state.items()
            if k.startswith(pre)}


# ---------------------------------------------------------------- Hugging Face safetensors


def test_extra_layer_is_named_before_any_tensor_is_read(tmp_path, hf, state, no_tensor_reads):
    path = hf_dir(hf, tmp_path, {**state, **layer(state, 1, LAYERS)})
    no_tensor_reads()
    msg = expect_error(lambda: load_hf_model(path), tmp_path, "does not account for")
    assert f"model.layers.{LAYERS}." in msg and "9 tensors" in msg and "and 5 more" in msg
    assert f"{LAYERS} layers" in msg  # what the config says


def test_unknown_tensor_name_is_named(tmp_path, hf, state, no_tensor_reads):
    path = hf_dir(hf, tmp_path, {**state, "model.vision_tower.proj.weight": np.ones((4, 4),
                                                                                  np.float32)})
    no_tensor_reads()
    expect_error(lambda: load_hf_model(path), tmp_path,
                 r"1 tensor \(model\.vision_tower\.proj\.weight\) that the config")


def test_extra_layer_in_a_later_shard(tmp_path, hf, state, no_tensor_reads):
    shards = {"model-00001-of-00002.safetensors": state,
              "model-00002-of-00002.safetensors": layer(state, 0, 5)}
    hf.save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    wmap = {}
    for f, t in shards.items():
        write_safetensors(tmp_path / f, t)
        wmap.update(dict.fromkeys(t, f))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    no_tensor_reads()
    expect_error(lambda: load_hf_model(tmp_path), tmp_path, r"model\.layers\.5\.")


def test_ignorable_tensors_stay_ignored(tmp_path, state):
    """Rotary buffers of older checkpoints, and lm_head.weight of a tied model, load."""
    hf = tiny_hf_model("llama", tied=True)
    tied = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    tied["lm_head.weight"] = tied["model.embed_tokens.weight"]
    for i in range(LAYERS):
        tied[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    path = hf_dir(hf, tmp_path, tied)
    model, cfg = load_hf_model(path)
    assert cfg.tie_word_embeddings and cfg.num_layers == LAYERS


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.bool_])
def test_integer_weight_is_rejected(tmp_path, hf, state, no_tensor_reads, dtype):
    name = "model.layers.0.self_attn.q_proj.weight"
    path = hf_dir(hf, tmp_path, {**state, name: state[name].astype(dtype)})
    no_tensor_reads()
    expect_error(lambda: load_hf_model(path), tmp_path,
                 rf"{name} has dtype {np.dtype(dtype)}; weights must be floating point")


def test_bfloat16_weights_are_floating(tmp_path, hf, state):
    path = hf_dir(hf, tmp_path, {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()})
    model, _ = load_hf_model(path, param_dtype="bfloat16")
    assert model.dtype == np.dtype("bfloat16")


def test_truncated_safetensors_names_the_file(tmp_path, hf, no_tensor_reads):
    path = hf_dir(hf, tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    no_tensor_reads()
    expect_error(lambda: load_hf_model(path), tmp_path,
                 r"model\.safetensors: tensor .* ends at byte .* truncated \(re-download it\)")


@pytest.mark.parametrize("damage, phrase", [
    (lambda b: b[:5], r"only 5 bytes, not a safetensors file; .*re-download"),
    (lambda b: b"", r"only 0 bytes"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], r"header length 1000000000 exceeds"),
    (lambda b: b[:8] + b"\xff\xfe" + b[10:], r"corrupt safetensors header .*re-download"),
    (lambda b: (8).to_bytes(8, "little") + b"[1, 2]  " + b[16:],
     r"corrupt safetensors header \(a JSON list"),
])
def test_damaged_safetensors_header(tmp_path, hf, damage, phrase):
    path = hf_dir(hf, tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    expect_error(lambda: load_hf_model(path), tmp_path, "model.safetensors: " + phrase)


@pytest.mark.parametrize("entry, phrase", [
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [-16, 0]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": ["0", 16]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0]}, "malformed header entry"),
    ({"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}, "has 12 bytes of data"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [10**6, 10**6 + 16]}, "truncated"),
    ({"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [0, 4]}, "unsupported or missing"),
    ("not a dict", "malformed header entry"),
])
def test_bad_header_entries(tmp_path, entry, phrase):
    hb = json.dumps({"w": entry}).encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(len(hb).to_bytes(8, "little") + hb + bytes(16))
    msg = expect_error(lambda: SafetensorsFile(f), tmp_path, phrase)
    assert str(f) in msg and "'w'" in msg


@pytest.mark.parametrize("index, phrase", [
    (b"\x89PNG\r\n", r"not a valid safetensors index"),
    (b"[1, 2]", r"not a valid safetensors index"),
    (b'{"weight_map": ["model.safetensors"]}', r"weight_map must map"),
    (b'{"weight_map": {"w": "../elsewhere/model.safetensors"}}', r"in the same directory"),
    (b'{"weight_map": {}}', r"lists no shards"),
])
def test_damaged_index(tmp_path, hf, index, phrase):
    path = hf_dir(hf, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_bytes(index)
    expect_error(lambda: load_hf_model(path), tmp_path, phrase)


@pytest.mark.parametrize("config, phrase", [
    (b"\xff\xfe\x00garbage", r"config\.json: not valid JSON .*re-download"),
    (b'["llama"]', r"config\.json: a JSON list, not the object"),
])
def test_damaged_config_json(tmp_path, hf, config, phrase):
    path = hf_dir(hf, tmp_path)
    (tmp_path / "config.json").write_bytes(config)
    expect_error(lambda: load_hf_model(path), tmp_path, phrase)


def test_damaged_tokenizer_json_is_named(tmp_path, hf):
    path = hf_dir(hf, tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"truncated": ')
    expect_error(lambda: hf_tokenizer(path), tmp_path,
                 r"tokenizer\.json: not a readable tokenizer .*re-download")


# ---------------------------------------------------------------- Hugging Face Flax msgpack


def test_flax_extra_layer_is_named(tmp_path, hf, no_tensor_reads):
    from flax import serialization

    path = write_flax_checkpoint(hf, tmp_path)
    f = tmp_path / "flax_model.msgpack"
    tree = serialization.msgpack_restore(f.read_bytes())
    tree["model"]["layers"][str(LAYERS)] = tree["model"]["layers"]["0"]
    f.write_bytes(serialization.msgpack_serialize(tree))
    no_tensor_reads()
    expect_error(lambda: load_flax_model(path), tmp_path,
                 rf"9 tensors \(model/layers/{LAYERS}/.* that the config")


def test_flax_sharded_extra_tensor_fails_before_any_shard_is_read(tmp_path, hf, monkeypatch):
    path = write_flax_checkpoint(hf, tmp_path, shards=3)
    index = tmp_path / "flax_model.msgpack.index.json"
    meta = json.loads(index.read_text())
    meta["weight_map"]["model/layers/7/mlp/up_proj/kernel"] = "flax_model-00003-of-00003.msgpack"
    index.write_text(json.dumps(meta))

    def boom(_):
        raise AssertionError("a shard was read before the index check")
    monkeypatch.setattr(convert_flax, "read_shard", boom)
    expect_error(lambda: load_flax_model(path), tmp_path, r"model/layers/7/mlp/up_proj/kernel")


def test_flax_integer_kernel_is_rejected(tmp_path, hf, no_tensor_reads):
    from flax import serialization

    path = write_flax_checkpoint(hf, tmp_path)
    f = tmp_path / "flax_model.msgpack"
    tree = serialization.msgpack_restore(f.read_bytes())
    mlp = tree["model"]["layers"]["1"]["mlp"]
    mlp["down_proj"]["kernel"] = mlp["down_proj"]["kernel"].astype(np.int32)
    f.write_bytes(serialization.msgpack_serialize(tree))
    no_tensor_reads()
    expect_error(lambda: load_flax_model(path), tmp_path,
                 r"model/layers/1/mlp/down_proj/kernel has dtype int32")


@pytest.mark.parametrize("damage, phrase", [
    (lambda b: b[: len(b) // 2], r"not a readable Flax msgpack file .*re-download"),
    (lambda b: b"", r"not a readable Flax msgpack file"),
    (lambda b: b"\x93\x01\x02\x03", r"the msgpack root is list, not a dict.*re-download"),
])
def test_damaged_msgpack_names_the_file(tmp_path, hf, damage, phrase):
    path = write_flax_checkpoint(hf, tmp_path)
    f = tmp_path / "flax_model.msgpack"
    f.write_bytes(damage(f.read_bytes()))
    expect_error(lambda: load_flax_model(path), tmp_path, "flax_model.msgpack: " + phrase)


def test_flax_tied_lm_head_stays_ignored(tmp_path):
    from flax import serialization

    hf = tiny_hf_model("llama", tied=True)
    path = write_flax_checkpoint(hf, tmp_path)
    f = tmp_path / "flax_model.msgpack"
    tree = serialization.msgpack_restore(f.read_bytes())
    tree["lm_head"] = {"kernel": tree["model"]["embed_tokens"]["embedding"].T.copy()}
    f.write_bytes(serialization.msgpack_serialize(tree))
    _, cfg = load_flax_model(path)
    assert cfg.tie_word_embeddings


# ---------------------------------------------------------------- GGUF


def write_gguf(path, *, tensors=None, tokens=True, head_count=4):
    """A tiny llama GGUF (random weights: only loading is under test here)."""
    rng = np.random.default_rng(0)
    hidden, mlp, kv = 64, 96, 2
    if tensors is None:
        tensors = {"token_embd.weight": (VOCAB, hidden), "output_norm.weight": (hidden,),
                   "output.weight": (VOCAB, hidden)}
        for i in range(LAYERS):
            tensors.update({f"blk.{i}.{k}.weight": s for k, s in {
                "attn_q": (hidden, hidden), "attn_k": (kv * 16, hidden),
                "attn_v": (kv * 16, hidden), "attn_output": (hidden, hidden),
                "ffn_gate": (mlp, hidden), "ffn_up": (mlp, hidden), "ffn_down": (hidden, mlp),
                "attn_norm": (hidden,), "ffn_norm": (hidden,)}.items()})
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(mlp)
    if isinstance(head_count, str):
        w.add_string("llama.attention.head_count", head_count)
    else:
        w.add_head_count(head_count)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    if tokens:
        w.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(VOCAB - 3)])
    w.add_token_merges(["a b"])
    for name, spec in tensors.items():
        a = spec if isinstance(spec, np.ndarray) else rng.standard_normal(spec)
        w.add_tensor(name, np.asarray(a, a.dtype if a.dtype != np.float64 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_tiny_gguf_loads(tmp_path):
    """The baseline the damaged variants below start from."""
    model, cfg, tok = load_gguf_model(write_gguf(tmp_path / "m.gguf"))
    assert cfg.num_layers == LAYERS and cfg.vocab_size == VOCAB
    assert tok.encode("ab") == [2]


@pytest.mark.parametrize("damage, phrase", [
    (lambda b: b"GGUX" + b[4:], r"not a GGUF file \(magic b'GGUX'.*re-download"),
    (lambda b: b[:-100], r"not a readable GGUF file .*truncated or corrupt .*re-download"),
    (lambda b: b[:200], r"not a readable GGUF file"),
    (lambda b: b[:4] + (99).to_bytes(4, "little") + b[8:], r"not a readable GGUF file"),
])
def test_damaged_gguf_names_the_file(tmp_path, damage, phrase):
    f = tmp_path / "m.gguf"
    write_gguf(f)
    f.write_bytes(damage(f.read_bytes()))
    expect_error(lambda: load_gguf_model(f), tmp_path, "m.gguf: " + phrase)


@pytest.fixture(scope="module")
def gguf_tensors(tmp_path_factory) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(write_gguf(tmp_path_factory.mktemp("g") / "m.gguf"))
    return {t.name: np.array(t.data) for t in reader.tensors}


@pytest.mark.parametrize("extra, phrase", [
    ({"blk.9.attn_q.weight": np.ones((64, 64), np.float32)},
     r"1 tensor \(blk\.9\.attn_q\.weight\) that the config"),
    ({"blk.0.ffn_up.weight": np.ones((96, 64), np.int8)},
     r"blk\.0\.ffn_up\.weight has dtype int8; weights must be floating point"),
    ({"rope_freqs.weight": np.ones(8, np.float32)}, r"rope_freqs\.weight .*Hugging Face"),
])
def test_gguf_tensors_are_checked_before_decoding(tmp_path, gguf_tensors, no_tensor_reads,
                                                  extra, phrase):
    f = write_gguf(tmp_path / "m.gguf", tensors={**gguf_tensors, **extra})
    no_tensor_reads()
    expect_error(lambda: load_gguf_model(f), tmp_path, phrase)


def test_gguf_bad_metadata(tmp_path, no_tensor_reads):
    no_tensor_reads()
    f = write_gguf(tmp_path / "notok.gguf", tokens=False)
    expect_error(lambda: load_gguf_model(f), tmp_path, r"lacks a valid tokenizer\.ggml\.tokens")
    g = write_gguf(tmp_path / "heads.gguf", head_count="four")
    expect_error(lambda: load_gguf_model(g), tmp_path, r"does not describe a valid Llama")
