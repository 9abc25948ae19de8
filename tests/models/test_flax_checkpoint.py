"""Hugging Face Flax checkpoints (msgpack, Linen layout): loading, errors, and a quantized
Flax model through save/load and the CLI.

The checkpoints are written here without a hub: a torch `LlamaForCausalLM`'s weights in the
tree FlaxLlamaForCausalLM.save_pretrained writes (transformers 5 ships no Flax models), with
`flax.serialization.msgpack_serialize`, single-file or sharded with an index.
"""

import json
import os

import numpy as np
import pytest

from any4_jax import QuantConfig
from any4_jax.models.llama.convert_flax import (
    load_flax_model,
)
from any4_jax.models.llama.safetensors_io import CheckpointError
from tests.models.hf_tiny import ids, tiny_hf_model, torch_logits, write_flax_checkpoint

pytest.importorskip("torch")

ATOL = 2e-5


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shards", [1, 3])
def test_logits_match_torch(tmp_path, tied, shards):
    hf = tiny_hf_model("llama", tied=tied, rope_scaling=True)
    path = write_flax_checkpoint(hf, tmp_path / "ck", shards=shards)
    model, cfg = load_flax_model(path)
    assert cfg.tie_word_embeddings == tied
    np.testing.assert_allclose(np.asarray(model(ids())[0]), torch_logits(hf, ids()),
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
