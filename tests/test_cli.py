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
