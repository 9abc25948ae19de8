"""The GGUF loader on the embedded SmolLM2, against transformers' own GGUF loading."""

import numpy as np
import pytest

from any4_jax.models.llama.config import SMOLLM2_135M
from any4_jax.models.llama.convert_gguf import load_gguf_model, unpermute_rows
from any4_jax.models.llama.safetensors_io import CheckpointError

SENTENCES = [
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife.",
    "The quick brown fox jumps over the lazy dog. 12345 + 67890 = 80235.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]


def test_unpermute_inverts_llama_cpp_permute(rng):
    heads, head_dim, k = 3, 8, 5
    w = rng.standard_normal((heads * head_dim, k)).astype(np.float32)
    # llama.cpp's convert_hf_to_gguf permute: interleave the two rotary halves of each head
    permuted = (w.reshape(heads, 2, head_dim // 2, k).swapaxes(1, 2).reshape(w.shape))
    np.testing.assert_array_equal(unpermute_rows(permuted, heads), w)
    assert not np.array_equal(permuted, w)


def test_config_from_metadata(smollm2):
    c = smollm2.config
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "rope_theta", "tie_word_embeddings"):
        assert getattr(c, f) == getattr(SMOLLM2_135M, f), f
    assert smollm2.tokenizer.add_bos is False
    assert smollm2.tokenizer.eos_ids == (2,)


def test_tokenizer_matches_transformers(smollm2, transformers_smollm2, pride_text):
    _, hf_tok = transformers_smollm2
    for text in [*SENTENCES, pride_text[:60000]]:
        ours = smollm2.tokenizer.encode(text)
        ref = hf_tok(text, add_special_tokens=True)["input_ids"]
        assert ours == ref
        assert smollm2.tokenizer.decode(ours) == text


@pytest.mark.slow
def test_logits_match_transformers_gguf(smollm2, transformers_smollm2):
    import torch

    hf_model, _ = transformers_smollm2
    for text in SENTENCES:
        ids = np.asarray([smollm2.tokenizer.encode(text)], np.int32)
        with torch.no_grad():
            ref = hf_model(torch.as_tensor(ids)).logits.numpy()
        got, _ = smollm2.model(ids)
        # same dequantized float32 weights; logits of magnitude ~10-30
        np.testing.assert_allclose(np.asarray(got), ref, atol=2e-3, rtol=0)
        assert (np.asarray(got).argmax(-1) == ref.argmax(-1)).mean() > 0.97


def test_truncated_or_foreign_gguf_is_reported(tmp_path, smollm2_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as fh:
        cut.write_bytes(fh.read(5_000_000))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_gguf_model(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(CheckpointError, match=r"cut.gguf|junk.gguf"):
        load_gguf_model(junk)
