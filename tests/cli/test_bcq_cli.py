"""`any4 bcq-calibrate` and `any4 quantize --format bcq / --act-quant` on the embedded model."""

import json

import numpy as np

from any4_jax.cli import main
from any4_jax.quant import BCQCodebooks


def test_bcq_calibrate_then_quantize_w4a4(smollm2_path, tmp_path, capsys):
    books = tmp_path / "cb.npz"
    rc = main(["bcq-calibrate", smollm2_path, "--include", "layers.0.*", "--n-codebooks", "8",
               "--activations", "--num-samples", "2", "--bcq-max-iter", "5",
               "--out", str(books), "--json", str(tmp_path / "cb.json")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "7 layers; weight codebooks:" in err and "activation codebooks:" in err
    cb = BCQCodebooks.load(books)
    assert cb.n_codebooks == 8 and cb.activations.shape == (8, 16)
    assert json.loads((tmp_path / "cb.json").read_text())["info"]["layers"] == 7
    rec = tmp_path / "q.json"
    rc = main(["quantize", smollm2_path, "--format", "bcq", "--n-codebooks", "8",
               "--codebooks", str(books), "--act-quant", "bcq", "--include", "layers.0.*",
               "--eval", "--seq-len", "128", "--max-windows", "1", "--json", str(rec)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| bcq | Lb8/La64/Nc8 | 7 |" in out
    r = json.loads(rec.read_text())
    assert r["codebooks"] == str(books) and r["act_quant"]["kind"] == "bcq"
    assert abs(r["format_bits_per_weight"] - 4.5) < 0.01
    assert 3 < r["eval"]["ppl"] < 300
    assert all(layer["bcq"]["local"] is False for layer in r["report"]["layers"])


def test_bcq_flag_errors_name_the_fix(smollm2_path, tmp_path, capsys):
    assert main(["quantize", smollm2_path, "--format", "bcq", "--act-quant", "bcq"]) == 2
    assert "--act-quant bcq needs activation codebooks" in capsys.readouterr().err
    assert main(["quantize", smollm2_path, "--format", "any4", "--n-codebooks", "8"]) == 2
    assert "apply to format='bcq' only" in capsys.readouterr().err
    cb = BCQCodebooks(weights=np.tile(np.arange(-8, 8, dtype=np.float32), (16, 1)),
                      block_len=8, array_len=32, codebook_bits=6)
    cb.save(tmp_path / "cb.npz")
    assert main(["quantize", smollm2_path, "--format", "bcq", "--codebooks",
                 str(tmp_path / "cb.npz")]) == 2
    assert "array_len: codebooks 32, config 64" in capsys.readouterr().err
    assert main(["bcq-calibrate", smollm2_path, "--sample-weighting", "activations",
                 "--out", str(tmp_path / "x.npz")]) == 2
    assert "needs --stats" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
