"""Two processes on localhost (CPU, 2 devices each, gloo collectives) quantize a tiny Hugging
Face model with `any4 quantize --distributed`: the checkpoint's arrays equal those of the
one-process run bit for bit; then `any4 eval --distributed` evaluates it tensor parallel over
the 4 devices: the one-device perplexity within 1e-5. Every process has a timeout, so a hang
fails instead of blocking."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from any4_jax import checkpoint as ck

pytest.importorskip("torch")
TIMEOUT = 300


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.models.hf_tiny import tiny_hf_model
    from tests.tiny_lm import byte_tokenizer

    d = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_hf_model("llama").save_pretrained(d, safe_serialization=True)
    byte_tokenizer()._tok.save(str(d / "tokenizer.json"))
    (d / "text.txt").write_text("It is a truth universally acknowledged, that a single man "
                                "in possession of a good fortune must be in want of a wife. "
                                * 8)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def _quantize(*args, devices=1):
    cmd = [sys.executable, "-m", "any4_jax.cli", "quantize", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(devices))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _two_processes(*args, command="quantize"):
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "any4_jax.cli", command, *map(str, args), "--distributed",
         "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(2))
        for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outs


def _arrays(path):
    model, *_ = ck.load_quantized(path)
    _, state = nnx.split(model)
    return {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(state)}


@pytest.mark.slow
def test_two_processes_write_the_one_process_checkpoint_and_evaluate_it(hf_dir, tmp_path):
    flags = ["--format", "any4", "--group-size", "32", "--calibration", "none"]
    _quantize(hf_dir, *flags, "--out", tmp_path / "one")
    outs = _two_processes(hf_dir, *flags, "--out", tmp_path / "two")
    assert "| 2 | 14 |" in outs[0][0]  # process 0 prints the table: 2 processes, 14 layers
    a, b = _arrays(tmp_path / "one"), _arrays(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    meta = ck.read_metadata(tmp_path / "two")
    assert meta["run"]["distributed"]["processes"] == 2
    assert meta["run"]["distributed"]["rows_this_process"] * 2 == sum(
        layer["shape"][0] for layer in meta["quantized_layers"].values())
    # nothing but the checkpoint beside it (no partial directories left)
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]
    # sharded evaluation: 2 processes x 2 devices, tensor parallel, against one device
    one, two = tmp_path / "e1.json", tmp_path / "e2.json"
    ev = ["--text", str(hf_dir / "text.txt"), "--seq-len", "64"]
    r = subprocess.run([sys.executable, "-m", "any4_jax.cli", "eval", str(tmp_path / "two"),
                        *ev, "--json", str(one)], capture_output=True, text=True,
                       timeout=TIMEOUT, env=_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    outs = _two_processes(tmp_path / "two", *ev, "--json", two, command="eval")
    assert "sharded over 4 devices: " in outs[0][1]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["processes"] == 2 and b["devices"] == 4 and a["windows"] == b["windows"] >= 4
    np.testing.assert_allclose(b["window_nll"], a["window_nll"], rtol=1e-5)


def test_flags_the_multi_process_path_cannot_take_are_named(hf_dir, tmp_path, capsys):
    from any4_jax.cli import main

    assert main(["quantize", str(hf_dir), "--distributed", "--eval"]) == 2
    err = capsys.readouterr().err
    assert "--out is required" in err and "--eval runs in one process" in err
    assert "needs --stats FILE" in err
    assert main(["quantize", str(hf_dir), "--coordinator", "localhost:1", "--out",
                 str(tmp_path / "o"), "--calibration", "none"]) == 2
    assert "needs all three" in capsys.readouterr().err
