"""The `any4` command line."""

import json
import subprocess
import sys

import jax

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


def test_quantize_save_then_eval_and_generate_the_checkpoint(smollm2_path, pride_text,
                                                             tmp_path, capsys):
    out = tmp_path / "q"
    rec = tmp_path / "q.json"
    rc = main(["quantize", smollm2_path, "--format", "any4", "--group-size", "64",
               "--include", "layers.0.*", "--include", "layers.29.mlp.*", "--out", str(out),
               "--json", str(rec)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| SmolLM2-135M-Instruct.Q4_1.gguf | any4 | 64 | 10 |" in table
    r = json.loads(rec.read_text())
    assert r["calibration"]["source"] == "prompt" and r["report"]["mode"] == "sequential"
    assert len(r["report"]["layers"]) == 10
    assert main(["eval", str(out), "--seq-len", "128", "--max-windows", "2",
                 "--json", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["format"] == "any4" and 3 < e["ppl"] < 300
    assert main(["generate", str(out), "--prompt", "Hello", "--max-new-tokens", "3",
                 "--kernel", "xla"]) == 0
    assert "quantized layers: 10 (layout: 10 canonical; kernel: xla)" in capsys.readouterr().err
    if jax.default_backend() != "gpu":
        assert main(["generate", str(out), "--prompt", "Hello", "--kernel", "cuda"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    # an existing output directory is never clobbered silently
    assert main(["quantize", smollm2_path, "--format", "int4", "--include", "layers.0.*",
                 "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_calibrate_then_quantize_with_stats(smollm2_path, tmp_path, capsys):
    stats = tmp_path / "s.npz"
    assert main(["calibrate", smollm2_path, "--include", "layers.1.*", "--out",
                 str(stats)]) == 0
    rc = main(["quantize", smollm2_path, "--include", "layers.1.*", "--stats", str(stats),
               "--statistic", "mean_of_abs", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["report"]["mode"] == "stats"
    rc = main(["quantize", smollm2_path, "--include", "layers.2.*", "--stats", str(stats)])
    assert rc == 2
    assert "lack" in capsys.readouterr().err


def test_group_size_error_lists_layers(smollm2_path, capsys):
    assert main(["quantize", smollm2_path, "--group-size", "128"]) == 2
    err = capsys.readouterr().err
    assert "layers.0.self_attn.q_proj (K=576)" in err and "layers.29.mlp.up_proj" in err


def test_analyze_writes_table_json_and_plots(smollm2_path, tmp_path, capsys):
    out = tmp_path / "an"
    rc = main(["analyze", smollm2_path, "--formats", "int4,nf4,any4", "--include",
               "layers.3.self_attn.*", "--max-tokens", "64", "--out", str(out)])
    assert rc == 0
    assert "| any4 |" in capsys.readouterr().out
    rec = json.loads((out / "analysis.json").read_text())
    errs = {(r["path"], r["format"]): r for r in rec["layers"]}
    assert len(errs) == 12
    for p in ("layers.3.self_attn.q_proj", "layers.3.self_attn.o_proj"):
        assert errs[(p, "any4")]["output_rel_error"] < errs[(p, "int4")]["output_rel_error"]
    for f in ("layer_errors.png", "row_histogram.png"):
        assert (out / f).read_bytes()[:4] == b"\x89PNG"
