"""The `any4` command line."""

import json
import subprocess
import sys

from any4_jax.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "any4_jax.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "quantize-matrix" in out


def test_quantize_matrix_table_and_json(tmp_path, capsys):
    path = tmp_path / "r.json"
    rc = main(["quantize-matrix", "--rows", "32", "--cols", "256", "--group-size", "64",
               "--formats", "int4,nf4,any4", "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| any4 |" in out and "| nf4 |" in out
    res = json.loads(path.read_text())["results"]
    errs = {r["format"]: r["weight_rel_error"] for r in res}
    assert set(errs) == {"int4", "nf4", "any4"}
    assert errs["any4"] < errs["int4"]  # a learned table beats the uniform grid on t-tails


def test_bad_format_is_a_clear_usage_error(capsys):
    try:
        main(["quantize-matrix", "--formats", "int9"])
    except SystemExit as e:
        assert e.code == 2
    assert "n_bit=9 is out of range" in capsys.readouterr().err


def test_group_size_that_does_not_divide_k(capsys):
    rc = main(["quantize-matrix", "--rows", "8", "--cols", "96", "--group-size", "64"])
    assert rc == 2
    assert "not divisible by group_size=64" in capsys.readouterr().err


def test_eval_on_the_embedded_model(smollm2_path, pride_text, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    rc = main(["eval", smollm2_path, "--text", "prideprejudice", "--seq-len", "128",
               "--max-windows", "3", "--batch-size", "2", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| SmolLM2-135M-Instruct.Q4_1.gguf | prideprejudice | 128 | 3 |" in table
    rec = json.loads(out.read_text())
    assert rec["windows"] == 3 and rec["tokens"] == 384 and rec["format"] == "gguf"
    assert 3 < rec["ppl"] < 200 and rec["tokens_per_second"] > 0
    assert len(rec["window_nll"]) == 3


def test_generate_prints_continuation_and_speed(smollm2_path, capsys):
    rc = main(["generate", smollm2_path, "--prompt", "The capital of France is",
               "--max-new-tokens", "6"])
    assert rc == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("The capital of France is")
    assert len(cap.out.strip()) > len("The capital of France is")
    assert "tokens/s" in cap.err


def test_model_and_text_errors_name_the_fix(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "model.bin").write_bytes(b"\0" * 64)
    assert main(["eval", str(tmp_path / "model.bin")]) == 2
    assert "not GGUF" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "without config.json" in capsys.readouterr().err


def test_unknown_text_source(smollm2_path, capsys):
    assert main(["eval", smollm2_path, "--text", "no-such-text"]) == 2
    assert "not a file and not a known source" in capsys.readouterr().err
