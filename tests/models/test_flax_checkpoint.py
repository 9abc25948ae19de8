"""Hugging Face Flax checkpoints (msgpack, Linen layout) in; quantized params pytrees out.

The checkpoints are written here without a hub: a torch `LlamaForCausalLM`'s weights in the
tree FlaxLlamaForCausalLM.save_pretrained writes (transformers 5 ships no Flax models), with
`flax.serialization.msgpack_serialize`, single-file or sharded with an index.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from any4_jax import QuantConfig, QuantizedWeight
from any4_jax.models.llama.convert_flax import (
    flatten,
    load_flax_model,
    load_flax_params,
    unflatten,
)
from any4_jax.models.llama.safetensors_io import CheckpointError
from any4_jax.ptq.functional import Calibration, model_from_params, quantize_params
from tests.models.hf_tiny import VOCAB, tiny_hf_model, torch_logits

pytest.importorskip("torch")

ATOL = 2e-5


def linen_tree(hf_model) -> dict:
    """torch state dict -> the Linen-layout tree of FlaxLlamaForCausalLM."""
    flat = {}
    for name, t in hf_model.state_dict().items():
        a = t.detach().float().numpy()
        parts = name.split(".")
        if parts[-1] != "weight":
            continue
        if parts[:2] == ["model", "embed_tokens"]:
            flat["model/embed_tokens/embedding"] = a
        elif parts[-2].endswith("_proj") or parts[0] == "lm_head":
            flat["/".join(parts[:-1]) + "/kernel"] = a.T  # torch [out, in] -> [in, out]
        else:
            flat["/".join(parts)] = a
    if hf_model.config.tie_word_embeddings:
        flat.pop("lm_head/kernel", None)
    return unflatten(flat)


def write_flax_checkpoint(hf_model, path, *, shards: int = 1) -> str:
    from flax import serialization

    os.makedirs(path, exist_ok=True)
    hf_model.config.to_json_file(os.path.join(path, "config.json"))
    flat = flatten(linen_tree(hf_model))
    if shards == 1:
        with open(os.path.join(path, "flax_model.msgpack"), "wb") as fh:
            fh.write(serialization.msgpack_serialize(unflatten(flat)))
        return str(path)
    names = sorted(flat)
    chunks = np.array_split(np.arange(len(names)), shards)
    wmap = {}
    for i, idx in enumerate(chunks):
        fname = f"flax_model-{i + 1:05d}-of-{shards:05d}.msgpack"
        part = {names[j]: flat[names[j]] for j in idx}
        wmap.update({n: fname for n in part})
        with open(os.path.join(path, fname), "wb") as fh:
            fh.write(serialization.msgpack_serialize(unflatten(part)))
    with open(os.path.join(path, "flax_model.msgpack.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": wmap}, fh)
    return str(path)


def _ids(t=24, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (2, t)).astype(np.int32)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shards", [1, 3])
def test_logits_match_torch(tmp_path, tied, shards):
    hf = tiny_hf_model("llama", tied=tied, rope_scaling=True)
    path = write_flax_checkpoint(hf, tmp_path / "ck", shards=shards)
    model, cfg = load_flax_model(path)
    assert cfg.tie_word_embeddings == tied
    np.testing.assert_allclose(np.asarray(model(_ids())[0]), torch_logits(hf, _ids()),
                               atol=ATOL, rtol=0)


def test_errors_name_the_problem(tmp_path):
    hf = tiny_hf_model("llama")
    path = write_flax_checkpoint(hf, tmp_path / "ck", shards=3)
    os.remove(os.path.join(path, "flax_model-00002-of-00003.msgpack"))
    with pytest.raises(CheckpointError, match="flax_model-00002-of-00003.msgpack"):
        load_flax_model(path)

    path = write_flax_checkpoint(hf, tmp_path / "shape")
    cfg = json.loads((tmp_path / "shape" / "config.json").read_text())
    (tmp_path / "shape" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32,
                                                                "head_dim": 8}))
    with pytest.raises(CheckpointError, match=r"tensor [a-z_.0-9]+ has shape .* needs"):
        load_flax_model(path)

    path = write_flax_checkpoint(hf, tmp_path / "arch")
    (tmp_path / "arch" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_flax_model(path)

    path = write_flax_checkpoint(hf, tmp_path / "cut")
    f = tmp_path / "cut" / "flax_model.msgpack"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_flax_model(path)


def test_quantize_params_is_functional(tmp_path):
    hf = tiny_hf_model("llama")
    params = load_flax_params(write_flax_checkpoint(hf, tmp_path / "ck"))
    before = jax.tree.map(lambda a: a.copy(), params)
    q = quantize_params(params, QuantConfig(format="int4", group_size=32))
    # nothing mutated
    jax.tree.map(np.testing.assert_array_equal, params, before)
    qp = q["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(qp, QuantizedWeight) and qp.shape == (64, 64)
    assert isinstance(q["lm_head"]["kernel"], np.ndarray)
    assert q["model"]["embed_tokens"]["embedding"] is params["model"]["embed_tokens"][
        "embedding"]
    # run it through our model: every decoder kernel is a QuantDense
    from any4_jax.models.llama.config import LlamaConfig

    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    model = model_from_params(q, cfg)
    ref_model = model_from_params(params, cfg)
    logits, _ = model(_ids())
    ref, _ = ref_model(_ids())
    rel = float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 0.3


def test_quantize_params_any4_with_statistics_and_by_running_the_model(tmp_path):
    from any4_jax.models.llama.config import LlamaConfig
    from any4_jax.ptq.calibrate import collect_offline, finalize
    from any4_jax.ptq.quantize_model import quantize_model, select_layers

    hf = tiny_hf_model("llama")
    path = write_flax_checkpoint(hf, tmp_path / "ck")
    params = load_flax_params(path)
    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    tokens = _ids(40)
    cq = QuantConfig(format="any4", group_size=32)
    with pytest.raises(ValueError, match="needs an activation statistic"):
        quantize_params(params, cq)
    model, _ = load_flax_model(path)
    sums, count = collect_offline(model, tokens, select_layers(model))
    stats = finalize(sums, count, "abs_of_mean")
    via_stats = quantize_params(params, cq, calibration=stats)
    seq = quantize_params(params, cq, calibration=Calibration(tokens, cfg))
    ref, _ = quantize_model(model, cq, tokens=tokens, progress=False)
    got = seq["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"]
    want = ref.layers[1].mlp.down_proj.qweight
    for f in ("codes", "lut", "scales", "zeros"):
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
    # the first layer group sees the unquantized input in both modes
    a = via_stats["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"]
    b = seq["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"]
    np.testing.assert_array_equal(a.lut, b.lut)


def test_quantize_save_load_eval_round_trip(tmp_path):
    from any4_jax.checkpoint import save_quantized
    from any4_jax.eval.perplexity import perplexity
    from any4_jax.loading import load_model
    from any4_jax.ptq.quantize_model import quantize_model
    from tests.tiny_lm import byte_tokenizer

    hf = tiny_hf_model("llama")
    path = write_flax_checkpoint(hf, tmp_path / "ck", shards=2)
    byte_tokenizer()._tok.save(os.path.join(path, "tokenizer.json"))
    lm = load_model(path)
    assert lm.format == "flax"
    ids = np.asarray(lm.tokenizer.encode("It is a truth universally acknowledged. " * 8))
    qm, _ = quantize_model(lm.model, QuantConfig(format="nf4", group_size=32), progress=False)
    out = save_quantized(tmp_path / "q", qm, tokenizer=lm.tokenizer, metadata={})
    back = load_model(out)
    a = perplexity(qm, ids, seq_len=32, progress=False)
    b = perplexity(back.model, ids, seq_len=32, progress=False)
    assert a.window_nll == b.window_nll


def test_cli_detects_the_flax_format(tmp_path, capsys):
    from any4_jax.cli import main
    from tests.tiny_lm import byte_tokenizer

    path = write_flax_checkpoint(tiny_hf_model("llama"), tmp_path / "ck")
    byte_tokenizer()._tok.save(os.path.join(path, "tokenizer.json"))
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    assert main(["eval", path, "--text", str(text), "--seq-len", "64", "--max-windows", "2",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["format"] == "flax"
    assert main(["quantize", path, "--format", "int4", "--group-size", "32",
                 "--out", str(tmp_path / "q")]) == 0
    assert "| ck | int4 | 32 | 14 |" in capsys.readouterr().out
