"""The command line on a Mixtral directory: quantize, eval and generate take it unchanged."""

import json

from any4_jax.cli import main
from tests.models.test_mixtral import save_tiny_mixtral


def test_quantize_eval_generate_a_mixtral_directory(pride_text, tmp_path, capsys):
    src = tmp_path / "mixtral"
    save_tiny_mixtral(src)
    out, rec = tmp_path / "q", tmp_path / "q.json"
    assert main(["quantize", str(src), "--format", "any4", "--group-size", "32",
                 "--out", str(out), "--json", str(rec)]) == 0
    r = json.loads(rec.read_text())
    paths = [layer["path"] for layer in r["report"]["layers"]]
    assert "layers.1.block_sparse_moe.experts.w2" in paths
    assert not any(p.endswith("block_sparse_moe.gate") for p in paths)  # router stays dense
    assert r["report"]["uncalibrated_experts"] == {}
    capsys.readouterr()
    for model in (src, out):
        assert main(["eval", str(model), "--seq-len", "64", "--max-windows", "2",
                     "--json", str(tmp_path / "e.json")]) == 0
        e = json.loads((tmp_path / "e.json").read_text())
        assert 1 < e["ppl"] < 1e4
        assert main(["generate", str(model), "--prompt", "Hello", "--max-new-tokens", "3",
                     "--kernel", "cpu" if model == out else "auto"]) == 0
    assert "quantized layers: 14" in capsys.readouterr().err
