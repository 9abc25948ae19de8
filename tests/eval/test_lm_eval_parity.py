"""Parity with lm-eval's own Hugging Face model: the embedded SmolLM2, written as a Hugging
Face directory by transformers' GGUF reader, scored by `hf` (torch, float32) and by "any4"
(ours, float32) on the same requests.

The tolerance is lm-eval's: 1e-3 per request. What remains is mostly `hf`'s float32
log-softmax: on a 119-token continuation ours was 2e-5 from a float64 recomputation of the
same logits and `hf` 9.5e-4 (docs/lm_eval.md)."""

import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("torch")

from lm_eval.api.instance import Instance  # noqa: E402

from any4_jax.eval.lm_eval_tasks import build_tasks, chapters  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_dir(smollm2_path, tmp_path_factory):
    from any4_jax.eval.hf_reference import hf_directory_from_gguf

    return str(hf_directory_from_gguf(smollm2_path, tmp_path_factory.mktemp("hf") / "smollm2"))


@pytest.fixture(scope="module")
def task_dir(pride_text, tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks") / "austen"
    build_tasks(d, text=pride_text, source="prideprejudice", n_questions=40)
    return str(d)


def _hf(hf_dir, **kw):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=hf_dir, device="cpu", dtype="float32", **kw)


def _ours(hf_dir, **kw):
    from any4_jax.eval.lm_eval_model import Any4LM

    return Any4LM(hf_dir, progress=False, **kw)


def test_multiple_choice_task_scores_as_hf(hf_dir, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=task_dir)
    runs = {}
    for name, lm in (("hf", _hf(hf_dir, batch_size=8)), ("any4", _ours(hf_dir, batch_size=8))):
        runs[name] = lm_eval.simple_evaluate(model=lm, tasks=["austen_pp_next"], limit=15,
                                             task_manager=tm, log_samples=True)
    a, b = (runs[k]["samples"]["austen_pp_next"] for k in ("hf", "any4"))
    got = [(ra[0], rb[0]) for sa, sb in zip(a, b, strict=True)
           for ra, rb in zip(sa["resps"], sb["resps"], strict=True)]
    assert len(got) == 60
    diffs = [abs(x[0] - y[0]) for x, y in got]
    assert max(diffs) <= 1e-3, max(diffs)
    assert [x[1] for x, _ in got] == [y[1] for _, y in got]  # is_greedy
    ra, rb = (runs[k]["results"]["austen_pp_next"] for k in ("hf", "any4"))
    assert ra["acc,none"] == rb["acc,none"] and ra["acc_norm,none"] == rb["acc_norm,none"]


def test_rolling_loglikelihood_as_hf(hf_dir, pride_text):
    # 20-50 words (30-80 tokens): hf's float32 drift (3e-6 of the sum) stays under 1e-3
    paras = [p for c in chapters(pride_text)[1:15] for p in c if 20 <= len(p.split()) <= 50]
    reqs = [Instance("loglikelihood_rolling", {}, (p,), i) for i, p in enumerate(paras[:50])]
    # max_length 24: every paragraph takes two to four windows
    a = _hf(hf_dir, batch_size=8, max_length=24).loglikelihood_rolling(reqs, disable_tqdm=True)
    b = _ours(hf_dir, max_length=24).loglikelihood_rolling(reqs, disable_tqdm=True)
    assert len(reqs) == 50
    np.testing.assert_allclose(b, a, atol=1e-3, rtol=0)


def test_greedy_generation_as_hf(hf_dir, task_dir):
    import json
    import os

    with open(os.path.join(task_dir, "austen_pp_next.jsonl")) as fh:
        docs = [json.loads(line) for line in fh][:50]
    reqs = [Instance("generate_until", {}, (d["passage"] + "\n\n",
                                            {"until": ["."] if i % 2 else [","],
                                             "max_gen_toks": 10, "do_sample": False}), i)
            for i, d in enumerate(docs)]
    a = _hf(hf_dir, batch_size=1).generate_until(reqs, disable_tqdm=True)
    b = _ours(hf_dir).generate_until(reqs, disable_tqdm=True)
    assert a == b
    assert sum(bool(s) for s in a) > 25  # mostly non-empty strings were compared
