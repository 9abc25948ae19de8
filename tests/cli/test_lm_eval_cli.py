"""`any4 lm-eval` and `any4 lm-eval-tasks`: a small --limit run on the embedded model (the
offline tasks built on the way), and bad input refused before any model loads."""

import json
import os

import pytest

from any4_jax.cli import main

pytest.importorskip("lm_eval")


@pytest.fixture
def cache(tmp_path, monkeypatch, smollm2_path, pride_text):
    """A private assets cache holding links to the fetched model and text, so that the
    default task directory is built here and not in the user's cache."""
    from any4_jax import assets

    c = tmp_path / "cache"
    for src in (smollm2_path, assets.text_path("prideprejudice")):
        dst = c / os.path.relpath(src, assets.cache_dir())
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, dst)
    monkeypatch.setenv("ANY4_JAX_CACHE", str(c))
    return c


def test_lm_eval_small_limit(cache, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["lm-eval", "--tasks", "austen", "--limit", "3", "--json", str(out)]) == 0
    shown = capsys.readouterr()
    assert "building the offline lm-eval tasks" in shown.err
    assert "austen_pp_next" in shown.out and "word_perplexity" in shown.out
    r = json.loads(out.read_text())
    assert 0 <= r["results"]["austen_pp_next"]["acc,none"] <= 1
    assert 1 < r["results"]["austen_pp_rolling"]["word_perplexity,none"] < 1e4
    assert r["requests"]["loglikelihood"]["requests"] == 12  # 3 questions x 4 choices
    assert r["requests"]["loglikelihood_rolling"]["requests"] == 3
    assert (cache / "lm_eval_tasks" / "any4_tasks.json").is_file()


def test_bad_input_is_refused_before_loading(cache, tmp_path, capsys):
    assert main(["lm-eval", "--tasks", "austen_pp_nxet", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) ['austen_pp_nxet']" in err and "austen_pp_next" in err
    assert "model:" not in err  # nothing was loaded
    assert main(["lm-eval", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["lm-eval", "--include-path", str(tmp_path / "none")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_lm_eval_tasks_command(cache, tmp_path, capsys):
    d = tmp_path / "t"
    assert main(["lm-eval-tasks", "--out", str(d), "--questions", "7"]) == 0
    assert "austen_pp_next: 7 documents" in capsys.readouterr().out
    assert main(["lm-eval-tasks", "--out", str(d)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["lm-eval-tasks", "--out", str(d), "--overwrite", "--text", "emma"]) == 2
    assert "emma" in capsys.readouterr().err  # not fetched in this cache: named, nothing lost
    assert (d / "austen_pp_next.yaml").is_file()
