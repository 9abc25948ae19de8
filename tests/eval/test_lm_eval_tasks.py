"""The offline lm-eval tasks: parsing, the questions' invariants, reproducibility, and the
task directory written atomically and never over someone else's files."""

import json
import os

import pytest

from any4_jax.eval.lm_eval_tasks import (
    MANIFEST,
    build_tasks,
    chapters,
    next_paragraph_docs,
    rolling_docs,
    task_prefix,
)
from any4_jax.outputs import OutputExistsError

NOVEL = "TITLE\n\nBy Someone\n\n\n" + "\n\n".join(
    f"Chapter {c}\n\n" + "\n\n".join(
        " ".join(f"w{c}_{p}_{i}" for i in range(10 + (7 * p + c) % 25)) + "." for p in range(30))
    for c in range(1, 6))


def test_chapters_drop_front_matter_and_join_lines():
    text = "TITLE\n\nChapter 1\n\nOne line\nand the next.\n\nTwo.\n\nCHAPTER II\n\nThree."
    assert chapters(text) == [["One line and the next.", "Two."], ["Three."]]
    with pytest.raises(ValueError, match="Chapter N"):
        chapters("no headings here\n\nat all")


def test_questions_hold_their_invariants():
    chaps = chapters(NOVEL)
    flat = [p for c in chaps for p in c]
    docs = next_paragraph_docs(chaps, n=40, seed=0)
    assert len(docs) == 40
    for d in docs:
        answer = chaps[d["chapter"] - 1][d["paragraph"] - 1]
        assert d["choices"][d["label"]] == answer  # the true next paragraph
        assert d["passage"].endswith(chaps[d["chapter"] - 1][d["paragraph"] - 2])
        assert len(set(d["choices"])) == 4 and all(c in flat for c in d["choices"])
        n = len(answer.split())
        assert all(abs(len(c.split()) - n) <= 0.35 * n for c in d["choices"])
    assert {d["label"] for d in docs} == {0, 1, 2, 3}
    assert next_paragraph_docs(chaps, n=40, seed=0) == docs
    assert next_paragraph_docs(chaps, n=40, seed=1) != docs


def test_rolling_docs_cover_the_book_in_order():
    chaps = chapters(NOVEL)
    docs = rolling_docs(chaps, doc_words=100)
    assert "\n\n".join(d["text"] for d in docs) == "\n\n".join(p for c in chaps for p in c)
    assert all(len(d["text"].split()) >= 100 or d is docs[-1] or
               docs[docs.index(d) + 1]["chapter"] != d["chapter"] for d in docs)


def test_build_is_reproducible_atomic_and_safe(tmp_path):
    a = build_tasks(tmp_path / "a", text=NOVEL, source="prideprejudice", n_questions=20)
    build_tasks(tmp_path / "b", text=NOVEL, source="prideprejudice", n_questions=20)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted([MANIFEST, "austen_pp_next.jsonl", "austen_pp_next.yaml",
                            "austen_pp_rolling.jsonl", "austen_pp_rolling.yaml"])
    for n in names:
        if n.endswith(".jsonl") or n == MANIFEST:
            assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
    assert a["tasks"]["austen_pp_next"]["docs"] == 20
    assert str(tmp_path / "a" / "austen_pp_next.jsonl") in (
        tmp_path / "a" / "austen_pp_next.yaml").read_text()
    # an existing task directory: refused without overwrite, replaced with it
    with pytest.raises(OutputExistsError, match="--overwrite"):
        build_tasks(tmp_path / "a", text=NOVEL, source="prideprejudice")
    build_tasks(tmp_path / "a", text=NOVEL, source="prideprejudice", seed=3, overwrite=True)
    assert json.loads((tmp_path / "a" / MANIFEST).read_text())["seed"] == 3
    # a directory that is not ours is never touched, even with overwrite
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="not an any4 lm-eval task directory"):
        build_tasks(tmp_path / "mine", text=NOVEL, source="prideprejudice", overwrite=True)
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no debris


def test_task_names_follow_the_source():
    assert task_prefix("prideprejudice") == ("austen_pp", "austen")
    assert task_prefix("emma") == ("austen_emma", "austen")
    assert task_prefix("/x/My Book.txt") == ("text_my_book", "local_text")


def test_pride_and_prejudice_tasks(pride_text):
    chaps = chapters(pride_text)
    assert len(chaps) == 61
    docs = next_paragraph_docs(chaps, n=500, seed=0)
    assert len(docs) == 500
