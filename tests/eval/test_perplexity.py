"""The perplexity protocol against a direct torch computation, and the SmolLM2 check."""

import math

import numpy as np
import pytest

from any4_jax.eval.perplexity import perplexity, windows_of

pytest.importorskip("torch")


def _torch_ppl(model, ids, seq_len, max_windows=None):
    """GPTQ protocol, written out directly in torch (float32 logits)."""
    import torch

    win = windows_of(ids, seq_len, max_windows)
    nlls = []
    with torch.no_grad():
        for w in win:
            x = torch.as_tensor(w[None].astype(np.int64))
            logits = model(x).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:])
            nlls.append(float(nll))
    return math.exp(float(np.mean(nlls))), nlls


def test_windows_drop_the_tail_and_refuse_short_texts():
    w = windows_of(np.arange(10), 4)
    np.testing.assert_array_equal(w, [[0, 1, 2, 3], [4, 5, 6, 7]])
    assert windows_of(np.arange(10), 4, max_windows=1).shape == (1, 4)
    with pytest.raises(ValueError, match="fewer than one window"):
        windows_of(np.arange(3), 4)


def test_matches_torch_on_a_tiny_checkpoint(tmp_path):
    from any4_jax.models.llama.convert_hf import load_hf_model
    from tests.models.hf_tiny import VOCAB, tiny_hf_model

    hf = tiny_hf_model("llama", seed=1)
    hf.save_pretrained(tmp_path)
    ours, _ = load_hf_model(tmp_path)
    ids = np.random.default_rng(0).integers(0, VOCAB, 5 * 64 + 17)
    ref, ref_nll = _torch_ppl(hf, ids, 64)
    r1 = perplexity(ours, ids, seq_len=64, batch_size=1, progress=False)
    r3 = perplexity(ours, ids, seq_len=64, batch_size=3, progress=False)  # padded last batch
    assert r1.windows == r3.windows == 5 and r1.tokens == 5 * 64
    np.testing.assert_allclose(r1.window_nll, ref_nll, rtol=1e-5)
    np.testing.assert_allclose(r3.window_nll, r1.window_nll, rtol=1e-6)
    assert abs(r1.ppl / ref - 1) < 1e-5


@pytest.mark.slow
def test_smollm2_pride_and_prejudice_matches_transformers(smollm2, transformers_smollm2,
                                                          pride_text):
    """docs/design.md's check: 16 windows of 2048 tokens, no BOS, within 0.2% of transformers."""
    hf_model, _ = transformers_smollm2
    ids = smollm2.tokenizer.encode(pride_text)
    assert ids[0] != smollm2.config.bos_token_id  # the GGUF tokenizer adds no BOS
    ours = perplexity(smollm2.model, ids, seq_len=2048, max_windows=16, batch_size=2,
                      progress=False)
    ref, ref_nll = _torch_ppl(hf_model, np.asarray(ids), 2048, max_windows=16)
    assert ours.windows == 16 and ours.tokens == 16 * 2048
    assert abs(ours.ppl / ref - 1) < 0.002, (ours.ppl, ref)
    np.testing.assert_allclose(ours.window_nll, ref_nll, rtol=1e-3)
    print(f"SmolLM2 P&P 16x2048: ours {ours.ppl:.4f}, transformers {ref:.4f}")
