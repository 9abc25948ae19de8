"""Bad inputs to the `any4` command line: every one is a one-line error with exit code 2 (1 for
an unexpected failure), raised before the model is loaded wherever the input alone can tell,
with no Python traceback unless ANY4_JAX_DEBUG=1, and nothing written or deleted.

Most cases call `any4_jax.cli.main` in-process (seconds); a few run `python -m any4_jax.cli` as
a subprocess for the exit code and stderr a user sees. The model is the tiny partly quantized
checkpoint of conftest.py.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from any4_jax import checkpoint as ck
from any4_jax import outputs
from any4_jax.cli import main
from any4_jax.cli import model as cli_model
from any4_jax.cli import quantize as cli_quantize
from any4_jax.nn import QuantDense, dense_layers
from any4_jax.ptq.quantize_model import model_bytes
from tests.reliability.tree import assert_same, debris, snapshot, unchanged

# the fastest real quantization of the tiny checkpoint: int4 needs no calibration
INT4 = ["--format", "int4", "--group-size", "32", "--calibration", "none"]


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    """Each case in its own directory (eval's default --json is relative), without debug."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ANY4_JAX_DEBUG", raising=False)


@pytest.fixture
def no_load(monkeypatch):
    """Loading the model fails the case: the error must come before it."""
    def boom(args):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(cli_quantize, "load", boom)
    monkeypatch.setattr(cli_model, "load", boom)


def any4(*argv) -> int:
    """`main(argv)`'s exit code, argparse's usage errors (SystemExit) included."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def refused(capsys, phrase: str, *argv, code: int = 2) -> str:
    """Runs `any4 argv`: exit `code`, and the last line of stderr is `any4 COMMAND: error:`
    with `phrase` in it (the message is that one line; no traceback)."""
    rc = any4(*argv)
    err = capsys.readouterr().err
    assert rc == code, err
    last = (err.strip().splitlines() or [""])[-1]
    assert last.startswith("any4 ") and ": error: " in last, err
    assert phrase in last, err
    assert "Traceback" not in err
    return err


def any4_process(*argv, cwd, env=None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "ANY4_JAX_DEBUG"}
    return subprocess.run([sys.executable, "-m", "any4_jax.cli", *map(str, argv)], cwd=cwd,
                          env={**e, **(env or {})}, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- --out: never lose a user's data


@pytest.mark.usefixtures("no_load")
def test_overwrite_dot_in_a_project_directory_is_refused(tiny_ck_master, user_project,
                                                         monkeypatch, capsys, tmp_path):
    """The data-loss bug: `any4 quantize --out . --overwrite` replaced the whole directory."""
    monkeypatch.chdir(user_project)
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, "is not an any4 checkpoint; it is left as it is", "quantize",
                tiny_ck_master, "--out", ".", "--overwrite")


def test_overwrite_dot_in_a_project_directory_as_a_process(tiny_ck_master, user_project,
                                                           tmp_path):
    with unchanged(tmp_path, tiny_ck_master):
        p = any4_process("quantize", tiny_ck_master, "--out", ".", "--overwrite",
                         cwd=user_project)
    assert p.returncode == 2, p.stderr
    assert "overwrite only ever replaces an any4 checkpoint" in p.stderr
    assert "Traceback" not in p.stderr and "model:" not in p.stderr
    assert p.stderr.strip().count("\n") == 0  # one line


@pytest.mark.usefixtures("no_load")
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_out_a_regular_file_is_refused_before_any_work(tiny_ck_master, overwrite, capsys,
                                                       tmp_path):
    (tmp_path / "model.bin").write_bytes(os.urandom(1000))
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, "model.bin exists and is not a directory", "quantize", tiny_ck_master,
                "--out", "model.bin", *overwrite)
    assert debris(tmp_path, "model.bin") == []


@pytest.mark.usefixtures("no_load")
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize("kind", ["user-files", "empty", "a-copied-any4.json"])
def test_out_a_directory_that_is_not_a_checkpoint(tiny_ck_master, user_project, overwrite,
                                                  kind, capsys, tmp_path):
    """Including a user's directory holding a copy of a checkpoint's any4.json among its own
    files: only a directory with nothing but a checkpoint's entries is one."""
    target = user_project
    if kind == "empty":
        target = tmp_path / "empty"
        target.mkdir()
    elif kind == "a-copied-any4.json":
        shutil.copy(tiny_ck_master / "any4.json", user_project)
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, "is not an any4 checkpoint", "quantize", tiny_ck_master, "--out",
                target, *overwrite)


@pytest.mark.usefixtures("no_load")
def test_out_a_symlink_to_a_checkpoint_is_refused(tiny_ck_master, tiny_ck, capsys, tmp_path):
    os.symlink(tiny_ck, tmp_path / "link")
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, "it is left as it is", "quantize", tiny_ck_master, "--out",
                tmp_path / "link", "--overwrite")


@pytest.mark.usefixtures("no_load")
def test_out_an_existing_checkpoint_needs_overwrite(tiny_ck_master, tiny_ck, capsys, tmp_path):
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, "pass --overwrite", "quantize", tiny_ck_master, "--out", tiny_ck)


def test_overwrite_replaces_an_existing_checkpoint(tiny_ck_master, tiny_ck, capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("a neighbour\n")
    others = lambda: {k: v for k, v in snapshot(tmp_path).items()
                      if k != "ck" and not k.startswith("ck/")}
    before = others()
    with unchanged(tiny_ck_master):
        assert any4("quantize", tiny_ck_master, *INT4, "--include", "layers.1.mlp.*",
                    "--out", tiny_ck, "--overwrite") == 0
    assert f"wrote {tiny_ck}" in capsys.readouterr().err
    meta = ck.read_metadata(tiny_ck)
    assert "note" not in meta["run"] and meta["run"]["quantization"]["format"] == "int4"
    assert len(meta["quantized_layers"]) == 7 + 3  # layers.0.* before, layers.1.mlp.* now
    assert debris(tmp_path, "ck") == []
    assert_same(before, others(), tmp_path)


# ---------------------------------------------------------------- integer storage dtypes


@pytest.mark.usefixtures("no_load")
@pytest.mark.parametrize("dtype", ["int8", "int32", "bool"])
def test_override_integer_dtype_before_loading(tiny_ck_master, dtype, capsys, tmp_path):
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, f"dtype={dtype!r} is not a floating dtype", "quantize", tiny_ck_master,
                "--override", f"layers.1.*:dtype={dtype}", "--out", "q")


def test_override_integer_dtype_as_a_process(tiny_ck_master, tmp_path):
    with unchanged(tmp_path, tiny_ck_master):
        p = any4_process("quantize", tiny_ck_master, "--override", "layers.1.*:dtype=int8",
                         "--out", "q", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "--override 'layers.1.*'" in p.stderr and "not a floating dtype" in p.stderr
    assert "Traceback" not in p.stderr and "model:" not in p.stderr


# ---------------------------------------------------------------- output paths, before any work


@pytest.mark.usefixtures("no_load")
def test_out_in_a_read_only_directory(tiny_ck_master, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes (see the "
                        "simulated case below)")
        with unchanged(tmp_path, tiny_ck_master):
            refused(capsys, "no permission to write in", "quantize", tiny_ck_master, "--out",
                    ro / "q")
    finally:
        ro.chmod(0o755)


@pytest.mark.usefixtures("no_load")
@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_output_in_a_directory_without_permission(tiny_ck_master, flag, capsys, tmp_path,
                                                  monkeypatch):
    """What a user without write permission sees, simulated (root ignores chmod)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(outputs.os, "access",
                        lambda p, mode: False if os.fspath(p) == str(ro) else real(p, mode))
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, f"{flag} {ro}/x: no permission to write in {ro}", "quantize",
                tiny_ck_master, flag, ro / "x")


@pytest.mark.usefixtures("no_load")
@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_output_under_a_regular_file(tiny_ck_master, flag, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, f"{flag} {tmp_path}/notes.txt/sub/x: {tmp_path}/notes.txt is a file, "
                "not a directory", "quantize", tiny_ck_master, flag,
                tmp_path / "notes.txt" / "sub" / "x")


@pytest.mark.usefixtures("no_load")
@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_json_a_directory(tiny_ck_master, command, capsys, tmp_path):
    (tmp_path / "results").mkdir()
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, f"--json {tmp_path / 'results'} is a directory; give a file name",
                command, tiny_ck_master, "--json", "results")


@pytest.mark.usefixtures("no_load")
def test_calibrate_out_a_directory(tiny_ck_master, capsys, tmp_path):
    (tmp_path / "stats").mkdir()
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, f"--out {tmp_path / 'stats'} is a directory", "calibrate",
                tiny_ck_master, "--out", "stats")


@pytest.mark.usefixtures("no_load")
def test_calibrate_with_calibration_none(tiny_ck_master, capsys, tmp_path):
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, "--calibration none has nothing to compute", "calibrate", tiny_ck_master,
                "--calibration", "none", "--out", "s.npz")


# ---------------------------------------------------------------- smaller flags


BAD_NUMBERS = [
    (["eval", "--max-windows", "0"], "argument --max-windows: 0 must be at least 1"),
    (["eval", "--max-windows", "-1"], "argument --max-windows: -1 must be at least 1"),
    (["eval", "--seq-len", "0"], "argument --seq-len: 0 must be at least 1"),
    (["quantize", "--max-windows", "0"], "argument --max-windows: 0 must be at least 1"),
    (["generate", "--prompt", "x", "--temperature", "-1"],
     "argument --temperature: -1 must be a finite number >= 0"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "must be a finite number >= 0"),
    (["generate", "--prompt", "x", "--top-p", "0"], "argument --top-p: 0 must be in (0, 1]"),
    (["generate", "--prompt", "x", "--top-p", "1.5"], "argument --top-p: 1.5 must be in (0, 1]"),
    (["quantize", "--group-size", "0"], "--group-size 0: must be positive"),
    (["quantize", "--max-iter", "-3"], "-3 must be 0 or more"),
    (["quantize", "--tol", "abc"], "'abc' is not a number"),
]


@pytest.mark.parametrize(("argv", "phrase"), BAD_NUMBERS,
                         ids=[" ".join(a for a in argv if a not in ("--prompt", "x"))
                              for argv, _ in BAD_NUMBERS])
def test_bad_numbers_are_usage_errors(argv, phrase, capsys, tmp_path, no_load):
    with unchanged(tmp_path):
        refused(capsys, phrase, *argv)


@pytest.mark.parametrize("command", ["eval", "quantize"])
def test_cache_that_is_a_file(command, capsys, tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("not a directory\n")
    monkeypatch.setenv("ANY4_JAX_CACHE", str(tmp_path / "cache"))
    with unchanged(tmp_path):
        refused(capsys, f"ANY4_JAX_CACHE={str(tmp_path / 'cache')!r} is not a directory",
                command)


@pytest.mark.usefixtures("no_load")
@pytest.mark.parametrize("command", ["quantize", "calibrate"])
def test_calibration_file_missing_names_the_flag(tiny_ck_master, command, capsys, tmp_path):
    with unchanged(tmp_path, tiny_ck_master):
        err = refused(capsys, "--calibration 'missing.txt': not a file", command,
                      tiny_ck_master, "--calibration", "missing.txt", "--out", "o.npz")
    assert "--text" not in err


@pytest.mark.usefixtures("no_load")
def test_calibration_file_not_utf8(tiny_ck_master, capsys, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    with unchanged(tmp_path, tiny_ck_master):
        err = refused(capsys, "--calibration latin1.txt: not UTF-8 text", "quantize",
                      tiny_ck_master, "--calibration", "latin1.txt")
    assert "--text" not in err


@pytest.mark.usefixtures("no_load")
def test_eval_text_missing_names_the_flag(tiny_ck_master, capsys, tmp_path):
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, "--text 'missing.txt': not a file", "quantize", tiny_ck_master,
                "--eval", "--text", "missing.txt")


@pytest.mark.usefixtures("no_load")
def test_stats_file_missing(tiny_ck_master, capsys, tmp_path):
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, "--stats missing.npz: not a readable .npz file", "quantize",
                tiny_ck_master, "--stats", "missing.npz")


OVERRIDE_SYNTAX = [
    ("layers.0.*", "expected PATTERN:key=value"),
    ("down_proj:", "expected PATTERN:key=value"),
    ("down_proj:group_size", "'group_size' is not key=value (expected PATTERN:key=value"),
    ("down_proj:bits=3", "unknown key 'bits'"),
    ("down_proj:symmetric=maybe", "symmetric='maybe' is not true or false"),
    ("down_proj:group_size=abc", "an integer or 'row'"),
]


@pytest.mark.parametrize(("spec", "phrase"), OVERRIDE_SYNTAX,
                         ids=[spec for spec, _ in OVERRIDE_SYNTAX])
def test_override_syntax_errors(tiny_ck_master, spec, phrase, capsys, tmp_path, no_load):
    with unchanged(tmp_path, tiny_ck_master):
        err = refused(capsys, phrase, "quantize", tiny_ck_master, "--override", spec)
    assert f"argument --override: --override {spec!r}" in err


@pytest.mark.parametrize(("argv", "phrase"), [
    (["--override", "dwn_proj:format=nf4"], "override pattern(s) ['dwn_proj'] match none of "
     "the 7 layers"),
    (["--override", "layers.0.*:format=nf4"], "override pattern(s) ['layers.0.*'] match none"),
    (["--include", "layers.0.*"], "(layers already quantized are skipped)"),
], ids=["typo", "already-quantized", "include-already-quantized"])
def test_patterns_that_match_no_layer(tiny_ck_master, argv, phrase, capsys, tmp_path):
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, phrase, "quantize", tiny_ck_master, *INT4, *argv, "--out", "q",
                "--json", "q.json")


# ---------------------------------------------------------------- errors: one line, exit codes


def test_unexpected_error_is_one_line_with_exit_code_1(tiny_ck_master, capsys, tmp_path,
                                                       monkeypatch):
    def fail(args):
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(cli_quantize, "load", fail)
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, "error: RuntimeError: the disk is on fire (ANY4_JAX_DEBUG=1 shows the "
                "traceback)", "quantize", tiny_ck_master, "--out", "q", code=1)
        monkeypatch.setenv("ANY4_JAX_DEBUG", "1")
        with pytest.raises(RuntimeError, match="the disk is on fire"):
            main(["quantize", str(tiny_ck_master), "--out", "q"])


@pytest.mark.usefixtures("no_load")
def test_debug_variable_with_a_bad_value(tiny_ck_master, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ANY4_JAX_DEBUG", "yes")
    with unchanged(tmp_path, tiny_ck_master):
        refused(capsys, "ANY4_JAX_DEBUG='yes': set it to 1 or 0", "quantize", tiny_ck_master)


def test_debug_variable_shows_the_traceback(tiny_ck_master, tmp_path):
    (tmp_path / "results").mkdir()
    with unchanged(tmp_path, tiny_ck_master):
        p = any4_process("quantize", tiny_ck_master, "--json", "results", cwd=tmp_path,
                         env={"ANY4_JAX_DEBUG": "1"})
    assert p.returncode == 1
    assert "Traceback (most recent call last)" in p.stderr
    assert "OutputError: --json" in p.stderr and "is a directory" in p.stderr


def test_damaged_checkpoint_is_one_line_naming_the_file(tiny_ck, tmp_path):
    meta = ck.read_metadata(tiny_ck)
    victim = max((f for f in meta["files"] if f.startswith("state/")),
                 key=lambda f: os.path.getsize(tiny_ck / f))
    with open(tiny_ck / victim, "r+b") as fh:
        fh.write(b"\x00garbage\x00")
    (tmp_path / "t.txt").write_text("It is a truth universally acknowledged. " * 20)
    with unchanged(tmp_path):
        p = any4_process("eval", tiny_ck, "--text", "t.txt", "--seq-len", "16", "--json",
                         "e.json", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert f"{victim} is damaged" in p.stderr
    assert p.stderr.strip().count("\n") == 0, p.stderr  # one line: no TensorStore dump
    assert "Traceback" not in p.stderr and "Event loop is closed" not in p.stderr


# ---------------------------------------------------------------- quantizing a checkpoint further


def _expected_bits_per_weight(path) -> float:
    """8 * bytes of every quantized layer / their weights, from the written checkpoint."""
    model = ck.load_quantized(path)[0]
    n = sum(layer.in_features * layer.out_features for _, layer in dense_layers(model)
            if isinstance(layer, QuantDense))
    return 8 * model_bytes(model)["quantized"] / n


@pytest.mark.parametrize(("argv", "layers"), [
    (["--include", "lm_head", "--exclude", "none"], 7 + 1),
    (["--include", "layers.*"], 7 + 7),  # layers.0.* are quantized already: skipped
], ids=["lm_head", "all-layers"])
def test_bits_per_weight_of_a_checkpoint_quantized_further(tiny_ck_master, argv, layers, capsys,
                                                          tmp_path):
    out, rec = tmp_path / "q", tmp_path / "q.json"
    with unchanged(tiny_ck_master):
        assert any4("quantize", tiny_ck_master, *INT4, *argv, "--out", out, "--json", rec) == 0
    table = capsys.readouterr().out
    assert len(ck.read_metadata(out)["quantized_layers"]) == layers
    want = _expected_bits_per_weight(out)
    r = json.loads(rec.read_text())
    assert r["bits_per_weight"] == pytest.approx(want, rel=1e-12)
    assert f"| {want:.3f} |" in table
    new = sum(x["shape"][0] * x["shape"][1] for x in r["report"]["layers"])
    assert r["bits_per_weight"] < 8 * r["memory_bytes"]["quantized_layers"] / new  # all counted
    assert sorted(os.listdir(tmp_path)) == ["q", "q.json"]


def test_quantize_a_checkpoint_in_place(tiny_ck, capsys, tmp_path):
    """--out naming the input checkpoint itself, with --overwrite: the model is read first,
    the checkpoint replaced only once the new one is complete."""
    assert any4("quantize", tiny_ck, *INT4, "--include", "lm_head", "--exclude", "none",
                "--out", tiny_ck, "--overwrite") == 0
    capsys.readouterr()
    assert len(ck.read_metadata(tiny_ck)["quantized_layers"]) == 8
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no .ck.old-PID / .ck.partial-PID left
