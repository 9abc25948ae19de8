"""Interrupting a real `any4 quantize` (SIGINT, SIGTERM, SIGKILL) before and during the save:
the target is absent or the previous complete checkpoint, the message says which, the exit
code is 130 / 143, no traceback, and a rerun leaves no debris."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from any4_jax import checkpoint as ck

pytestmark = pytest.mark.slow

QUICK = ["--include", "layers.0.mlp.*", "--calibration", "none"]  # a second of quantizing


def _start(model, out, *extra):
    env = dict(os.environ)
    env.pop("ANY4_JAX_DEBUG", None)
    # The child raises KeyboardInterrupt on SIGINT even when it inherits SIGINT ignored (a test
    # run started in the background by a non-interactive shell does; Python then installs no
    # handler and the run would finish with 0)
    argv = ["any4", "quantize", model, *QUICK, "--out", str(out), *extra]
    code = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)"
            f"; sys.argv = {argv!r}; runpy.run_module('any4_jax.cli', run_name='__main__')")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(proc, cond, what, timeout=120.0):
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def _partial(out, pid):
    return out.parent / f".{out.name}.partial-{pid}"


def _interrupt_during_save(model, out, sig, *extra):
    proc = _start(model, out, *extra)
    _wait_for(proc, lambda: (_partial(out, proc.pid) / "state").exists(), "the save began")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc, err


def _siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def _clean(err):
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]


def test_sigint_during_the_save_writes_nothing(smollm2_path, tmp_path):
    out = tmp_path / "ck"
    proc, err = _interrupt_during_save(smollm2_path, out, signal.SIGINT)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; nothing was written" in err
    _clean(err)
    assert not out.exists() and _siblings(out) == []


def test_sigterm_during_an_overwrite_keeps_the_previous_checkpoint(smollm2_path, tmp_path):
    out = tmp_path / "ck"
    r = subprocess.run([sys.executable, "-m", "any4_jax.cli", "quantize", smollm2_path, *QUICK,
                        "--format", "nf4", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    before = ck.read_metadata(out)
    proc, err = _interrupt_during_save(smollm2_path, out, signal.SIGTERM, "--format", "int4",
                                       "--overwrite")
    assert proc.returncode == 143, err[-2000:]
    assert f"the previous checkpoint at {out} is intact" in err
    _clean(err)
    assert ck.read_metadata(out) == before  # still the nf4 checkpoint, whole
    assert ck.is_quantized_checkpoint(out) and _siblings(out) == []


def test_sigint_before_the_save_writes_nothing(smollm2_path, tmp_path):
    out = tmp_path / "ck"
    proc = _start(smollm2_path, out)
    lines = []

    def model_loaded():
        # stderr is read line by line until the model's line: the run is then quantizing
        lines.append(proc.stderr.readline())
        return lines[-1].startswith("model:")

    _wait_for(proc, model_loaded, "the model was loaded")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; nothing was written" in err
    _clean(err)
    assert not out.exists() and _siblings(out) == []


def test_sigkill_during_the_save_leaves_debris_that_the_next_save_removes(smollm2_path,
                                                                          tmp_path):
    out = tmp_path / "ck"
    proc, _ = _interrupt_during_save(smollm2_path, out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert _siblings(out) == [_partial(out, proc.pid).name]  # kill -9 cannot be caught
    r = subprocess.run([sys.executable, "-m", "any4_jax.cli", "quantize", smollm2_path, *QUICK,
                        "--out", str(out), "--json", str(tmp_path / "run.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ck.is_quantized_checkpoint(out)
    assert _siblings(out) == ["run.json"]  # the dead run's .partial directory is gone
    assert json.loads((tmp_path / "run.json").read_text())["bits_per_weight"] > 4
