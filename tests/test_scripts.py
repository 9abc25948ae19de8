"""The benchmark scripts run end to end on tiny inputs (on a CPU: the reference, the CPU kernel
and dense paths; the GPU kernels decline), so a GPU session never loses its time to a script
that no longer runs. Their figures mean nothing here."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, script, *args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args,
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_bench_kernels_runs(tmp_path):
    out = _run(tmp_path, "bench_kernels.py", "--shapes", "64x256", "--ms", "1,3",
               "--group-size", "64", "--reps", "1")
    assert "| 64x256 (64x256) | 3 |" in out
    rec = json.loads(next(tmp_path.glob("kernels_*.json")).read_text())
    assert len(rec["rows"]) == 2 and rec["rows"][0]["xla_s"] > 0


@pytest.mark.slow
def test_bench_decode_runs(tmp_path):
    out = _run(tmp_path, "bench_decode.py", "--model", "tiny", "--tokens", "6", "--runs", "1",
               "--group-size", "32", "--dtype", "float32")
    assert "| tiny |" in out and "| dense |" in out
    rec = json.loads(next(tmp_path.glob("decode_tiny_*.json")).read_text())
    assert rec["rows"][0]["tokens_per_s"] > 0 and rec["quantized_layers"] == 14
