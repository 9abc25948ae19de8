"""Text sources: the Austen novels, files, and the optional hub datasets."""

import sys

import pytest

from any4_jax.eval.data import TextSourceError, load_text


def test_file_and_novel_sources(tmp_path, pride_text):
    f = tmp_path / "t.txt"
    f.write_text("hello world", encoding="utf-8")
    assert load_text(str(f)) == ("hello world", str(f))
    text, desc = load_text("prideprejudice")
    assert text == pride_text and "janeaustenr" in desc


def test_non_utf8_and_unknown_sources(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TextSourceError, match="not UTF-8"):
        load_text(str(f))
    with pytest.raises(TextSourceError, match="known source"):
        load_text("wikitext-103")


def test_hub_dataset_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(TextSourceError, match="pip install datasets"):
        load_text("wikitext2")
