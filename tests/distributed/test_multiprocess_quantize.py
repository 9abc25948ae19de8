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


def _wait_all(procs) -> list[tuple[str, str]]:
    """(stdout, stderr) of every process; each must exit 0 within TIMEOUT (a hang fails: the
    ones still running are killed)."""
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


def _two_processes(*args, command="quantize"):
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "any4_jax.cli", command, *map(str, args), "--distributed",
         "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(2))
        for i in range(2)]
    return _wait_all(procs)


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


@pytest.mark.slow
def test_calibration_is_data_parallel_and_gives_the_one_process_result(hf_dir, tmp_path):
    """Calibration from text needs a forward: every process loads the model, runs its share of
    the calibration batches (4 batches of 2 windows: 2 each), the sums are gathered and added
    in batch order, and each process quantizes its share of every matrix's rows. Statistics
    and checkpoint equal the one-process ones bit for bit."""
    calib = ["--calibration", str(hf_dir / "text.txt"), "--num-samples", "8",
             "--calib-seq-len", "32", "--calib-batch-size", "2"]
    flags = ["--format", "any4", "--group-size", "32", *calib]
    _quantize(hf_dir, *flags, "--out", tmp_path / "one")
    outs = _two_processes(hf_dir, *flags, "--out", tmp_path / "two")
    assert outs[0][0].count("| any4 | 32 | 14 |") == 1 and "| any4 |" not in outs[1][0]
    a, b = _arrays(tmp_path / "one"), _arrays(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    run = ck.read_metadata(tmp_path / "two")["run"]
    assert run["distributed"]["processes"] == 2 and run["report"]["mode"] == "sequential"
    assert {layer["processes"] for layer in run["report"]["layers"]} == {2}  # rows shared out
    # `any4 calibrate`: the same statistics from 2 processes as from one
    r = subprocess.run([sys.executable, "-m", "any4_jax.cli", "calibrate", str(hf_dir), *calib,
                        "--calib-mode", "offline", "--out", str(tmp_path / "s1.npz")],
                       capture_output=True, text=True, timeout=TIMEOUT, env=_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    _two_processes(hf_dir, *calib, "--out", tmp_path / "s2.npz", command="calibrate")
    s1, s2 = np.load(tmp_path / "s1.npz"), np.load(tmp_path / "s2.npz")
    keys = [k for k in s1.files if k != "__meta__"]
    assert sorted(keys) == sorted(k for k in s2.files if k != "__meta__") and len(keys) == 28
    for k in keys:
        assert np.array_equal(s1[k], s2[k]), k
    meta = json.loads(str(s2["__meta__"]))
    assert meta["processes"] == 2 and meta["batches_per_process"] == [2, 2]
    assert sorted(os.listdir(tmp_path)) == ["one", "s1.npz", "s2.npz", "two"]


def _workers(n: int, *args) -> None:
    """tests/distributed/api_worker.py in `n` processes (2 devices each), or alone (1)."""
    port = _free_port()
    envs = [_env(1)] if n == 1 else [
        dict(_env(2), JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n),
             JAX_PROCESS_ID=str(i)) for i in range(n)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed.api_worker",
                               *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=e, cwd=os.path.dirname(os.path.dirname(
                                  os.path.dirname(os.path.abspath(__file__)))))
             for e in envs]
    _wait_all(procs)


@pytest.mark.slow
def test_the_library_api_runs_unchanged_under_jax_distributed(hf_dir, tmp_path):
    """`quantize_params` (statistics given) and `quantize_model` (GPTQ and AWQ, calibrated on
    text; a Mixtral with stacked experts, calibrated data parallel) called in each of 2
    processes: every process returns the same whole result; the rows were shared out (whole
    experts for the Mixtral); quantize_params, AWQ and the Mixtral equal one process bit for
    bit. GPTQ's X^T X is summed per process, then over processes (a different float32 order
    than one process): equal to one process up to that rounding (bit for bit here, not
    promised)."""
    from tests.models.test_mixtral import save_tiny_mixtral

    save_tiny_mixtral(tmp_path / "mixtral")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _workers(1, hf_dir, tmp_path / "mixtral", tmp_path / "one")
    _workers(2, hf_dir, tmp_path / "mixtral", tmp_path / "two")
    one = np.load(tmp_path / "one" / "p0.npz")
    p0, p1 = np.load(tmp_path / "two" / "p0.npz"), np.load(tmp_path / "two" / "p1.npz")
    assert set(one["processes"]) == {1} and set(p0["processes"]) == {2}
    for k in p0.files:  # the processes agree bit for bit
        assert np.array_equal(p0[k], p1[k]), k
    exact = [k for k in one.files if k.startswith(("params/", "awq/", "moe/"))]
    assert len(exact) == 8 + 28 + 2 * 14
    assert set(p0["moe_processes"]) == {2}  # 4 experts: 2 whole experts per process
    for k in exact:
        assert np.array_equal(one[k], p0[k]), k
    codes = [k for k in one.files if k.startswith("gptq/") and k.endswith("/codes")]
    assert len(codes) == 14
    same = np.mean([np.mean(one[k] == p0[k]) for k in codes])
    assert same > 0.99, same


def test_flags_the_multi_process_path_cannot_take_are_named(hf_dir, tmp_path, capsys):
    from any4_jax.cli import main

    assert main(["quantize", str(hf_dir), "--distributed"]) == 2
    assert "give --out" in capsys.readouterr().err
    assert main(["quantize", str(hf_dir), "--coordinator", "localhost:1", "--out",
                 str(tmp_path / "o"), "--calibration", "none"]) == 2
    assert "needs all three" in capsys.readouterr().err
