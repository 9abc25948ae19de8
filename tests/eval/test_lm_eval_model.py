"""The lm-eval model "any4" on the tiny random Llama: request semantics against brute force
(full logits in float64, lm-eval's own input construction), packing, buckets, generation with
stop strings, errors. The parity with lm-eval's `hf` model on SmolLM2 is
test_lm_eval_parity.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")

from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from any4_jax.eval.lm_eval_model import Any4LM  # noqa: E402
from any4_jax.eval.perplexity import window_nll  # noqa: E402
from any4_jax.eval.scoring import PACK_MAX, bucket, plan_rows  # noqa: E402
from any4_jax.models.llama.generate import generate_ids  # noqa: E402
from any4_jax.models.llama.tokenizer import Tokenizer  # noqa: E402
from tests.tiny_lm import byte_tokenizer, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    base = byte_tokenizer()
    eos, bos = base.encode("~")[0], base.encode("^")[0]
    tok = Tokenizer(base._tok, bos_id=bos, eos_ids=(eos,), add_bos=False, source="bytes")
    return tiny_model(seed=3), tok


@jax.jit
def _logits(state, tokens):
    return _GRAPH[0](state, tokens)


_GRAPH = []


def _brute(model, ctx, cont, max_len):
    """lm-eval's `hf` arithmetic in float64 from our own full logits (the input right-padded
    to 512 tokens: one compiled program; causality keeps the padding out)."""
    if not _GRAPH:
        graphdef, _ = nnx.split(model)
        _GRAPH.append(lambda state, t: nnx.merge(graphdef, state)(t)[0])
    inp = (ctx + cont)[-(max_len + 1):][:-1]
    padded = np.zeros((1, 512), np.int32)
    padded[0, :len(inp)] = inp
    logits = np.asarray(_logits(nnx.split(model)[1], jnp.asarray(padded))[0], np.float64)
    logits = logits[:len(inp)]
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    rows = np.arange(len(inp) - len(cont), len(inp))
    return float(lp[rows, cont].sum()), bool((logits[rows].argmax(-1) == cont).all())


def test_bucket_pads_at_most_half_and_is_monotone():
    prev = 0
    for n in range(1, 5000, 7):
        b = bucket(n)
        assert n <= b <= max(32, 1.5 * n) and b >= prev
        prev = b
    assert [bucket(n) for n in (1, 33, 49, 65, 97, 129)] == [32, 48, 64, 96, 128, 192]


def test_plan_rows_shares_prefixes_and_keeps_lm_eval_inputs():
    c = list(range(1, 10))
    reqs = [(c, [4, 5]), (c, [6]), (c, [7, 8, 9]), ([9, 9], [1])]
    rows = plan_rows(reqs, max_len=100)
    shared = [r for r in rows if len(r.members) > 1]
    assert len(shared) == 1 and shared[0].prefix == c
    assert sorted(m[0] for m in shared[0].members) == [0, 1, 2]
    # every request's lm-eval input is its row's prefix + its own tail
    for r in rows:
        for j, tail, cont in r.members:
            ctx, c = reqs[j]
            assert r.prefix + tail == (ctx + c)[-101:][:-1] and cont == c
    # left truncation moves the cut: a prefix of the last max_len tokens
    (row,) = plan_rows([(list(range(1, 50)), [60, 61, 62])], max_len=10)
    assert row.prefix + row.members[0][1] == list(range(42, 50)) + [60, 61]
    # a group longer than PACK_MAX is split into rows that each keep the prefix
    assert all(len(r.members) == 1 for r in plan_rows([([5], [1, 2]), ([5], [3])], max_len=9))
    many = [([1] * 10, [2] * 300) for _ in range(8)]
    rows = plan_rows(many, max_len=PACK_MAX)
    assert all(r.length <= PACK_MAX for r in rows) and sum(len(r.members) for r in rows) == 8


@pytest.mark.parametrize("max_length", [512, 48])
def test_loglikelihood_equals_brute_force(tiny, max_length):
    model, tok = tiny
    lm = Any4LM(model=model, tokenizer=tok, batch_size=3, max_length=max_length,
                progress=False)
    rng = np.random.default_rng(0)
    words = ["the", "a", "house", "Mr. Darcy", "walked", "slowly", "into", "town", ","]
    reqs = []
    for q in range(6):  # multiple choice: four continuations of one context each
        ctx = " ".join(rng.choice(words, 4 + 3 * q))
        reqs += [Instance("loglikelihood", {}, (ctx, " " + " ".join(rng.choice(words, k))), i)
                 for i, k in enumerate((1, 2, 3, 5))]
    reqs.append(Instance("loglikelihood", {}, ("", "walked into town"), 0))  # empty context
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for req, (ll, greedy) in zip(reqs, got, strict=True):
        ctx, cont = req.args
        if ctx:
            c_ids, k_ids = lm._encode_pair(ctx, cont)
        else:
            c_ids, k_ids = [lm.prefix_token_id], tok.encode(cont)
        want, want_greedy = _brute(model, c_ids, k_ids, max_length)
        assert ll == pytest.approx(want, abs=2e-4)
        assert greedy == want_greedy
    assert lm.stats["loglikelihood"]["requests"] == len(reqs)


def test_many_continuations_of_one_prefix(tiny):
    """Packed rows score more positions than they hold tokens (one more per member)."""
    model, tok = tiny
    lm = Any4LM(model=model, tokenizer=tok, batch_size=2, progress=False)
    rng = np.random.default_rng(1)
    ctx = rng.integers(0, 256, 8).tolist()
    reqs = [(None, ctx, rng.integers(0, 256, 40).tolist()) for _ in range(7)]
    got = lm._loglikelihood_tokens(reqs)
    for (_, ctx, cont), (ll, _) in zip(reqs, got, strict=True):
        assert ll == pytest.approx(_brute(model, ctx, cont, 512)[0], abs=2e-4)


def test_greedy_flag_is_true_for_the_models_own_continuation(tiny):
    model, tok = tiny
    lm = Any4LM(model=model, tokenizer=tok, progress=False)
    ctx = tok.encode("It is a truth")
    new, *_ = generate_ids(model, ctx, max_new_tokens=6)
    cont = tok.decode(new)
    [(ll, greedy)] = lm._loglikelihood_tokens([(None, ctx, new)])
    assert greedy and ll < 0
    [(_, other)] = lm._loglikelihood_tokens([(None, ctx, [(new[0] + 1) % 256] + new[1:])])
    assert not other and cont


def test_rolling_matches_the_perplexity_accounting(tiny):
    """With windows of L + 1 tokens overlapping by one (the prefix token first), lm-eval's
    rolling log-likelihood is -L x the sum of `window_nll` (any4 eval's per-window mean)."""
    model, tok = tiny
    L = 16
    lm = Any4LM(model=model, tokenizer=tok, max_length=L, progress=False)
    text = "It is a truth universally acknowledged, that a single man in possession of a goo"
    ids = tok.encode(text)
    assert len(ids) % L == 0
    [ll] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)],
                                    disable_tqdm=True)
    seq = [lm.prefix_token_id] + ids
    windows = np.array([seq[i:i + L + 1] for i in range(0, len(ids), L)], np.int32)
    want = -L * float(np.sum(np.asarray(window_nll(model, jnp.asarray(windows)), np.float64)))
    assert ll == pytest.approx(want, abs=2e-4)
    # and lm-eval's own windows are these
    got = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
        ids, prefix_token=lm.prefix_token_id, max_seq_len=L, context_len=1)]
    assert len(got) == len(windows)


def test_generate_until_stops_at_strings_and_eos(tiny):
    model, tok = tiny
    lm = Any4LM(model=model, tokenizer=tok, max_gen_toks=12, progress=False)
    ctx = "Elizabeth said"
    ids = tok.encode(ctx)
    free, *_ = generate_ids(model, ids, max_new_tokens=12)
    free_text = tok.decode(free)
    stop = free_text[3:5]  # a string the greedy continuation contains
    reqs = [Instance("generate_until", {}, (ctx, {"until": [stop], "do_sample": False}), 0),
            Instance("generate_until", {}, (ctx, {"until": ["\u2603"], "max_gen_toks": 5}), 1)]
    a, b = lm.generate_until(reqs, disable_tqdm=True)
    assert a == free_text.split(stop)[0]
    assert b == tok.decode(free[:5])
    assert lm.stats["generate_until"]["requests"] == 2


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    req = [Instance("generate_until", {}, ("Mr. Bennet",
                                           {"do_sample": True, "temperature": 1.0,
                                            "max_gen_toks": 8, "until": []}), 0)]
    a = Any4LM(model=model, tokenizer=tok, seed=5, progress=False).generate_until(req, True)
    b = Any4LM(model=model, tokenizer=tok, seed=5, progress=False).generate_until(req, True)
    c = Any4LM(model=model, tokenizer=tok, seed=6, progress=False).generate_until(req, True)
    assert a == b and a != c


def test_bad_arguments_are_named(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="unknown argument"):
        Any4LM(model=model, tokenizer=tok, temprature=1)
    with pytest.raises(ValueError, match="kernel="):
        Any4LM(model=model, tokenizer=tok, kernel="tpu")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Any4LM(model=model, tokenizer=tok, max_length=100000)
    with pytest.raises(ValueError, match="batch_size"):
        Any4LM(model=model, tokenizer=tok, batch_size="many")
    with pytest.raises(ValueError, match="tokenizer="):
        Any4LM(model=model)
    with pytest.raises(ValueError, match="EOS"):
        Any4LM(model=model, tokenizer=byte_tokenizer())
    lm = Any4LM(model=model, tokenizer=tok, max_length=8, progress=False)
    with pytest.raises(ValueError, match="longer than max_length"):
        lm._loglikelihood_tokens([(None, [1], list(range(9)))])
    with pytest.raises(ValueError, match="no room"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"max_gen_toks": 8}), 0)])


def test_registered_with_lm_eval(tiny):
    from lm_eval.api.registry import get_model

    assert get_model("any4") is Any4LM
    assert get_model("hf").__name__ == "HFLM"  # registering ours did not hide lm-eval's
