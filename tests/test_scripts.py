"""The benchmark scripts run end to end on tiny inputs (on a CPU: the reference, the CPU kernel
and dense paths; the GPU kernels decline), so a GPU session never loses its time to a script
that no longer runs. Their figures mean nothing here. Scripts run as subprocesses; the two
tests of a script's functions load its namespace with `runpy` (nothing is put on sys.path)."""

import json
import os
import runpy
import subprocess
import sys

import jax
import pytest

from any4_jax.kernels.tuning import FIELDS, default_config
from any4_jax.timing import descend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    return os.path.join(ROOT, "scripts", name)


def _run(tmp_path, script, *args):
    r = subprocess.run([sys.executable, _script(script), *args, "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_kernel_bench_runs(tmp_path):
    out = _run(tmp_path, "kernel_bench.py", "bench", "--shapes", "64x256", "--ms", "1,3",
               "--group-size", "64", "--reps", "1")
    assert "| 64x256 (64x256) | 3 |" in out
    rec = json.loads(next(tmp_path.glob("kernels_*.json")).read_text())
    assert len(rec["rows"]) == 2 and rec["rows"][0]["xla_s"] > 0
    assert rec["command"].startswith("python scripts/kernel_bench.py bench ")


@pytest.mark.slow
def test_bench_decode_runs(tmp_path):
    out = _run(tmp_path, "bench_decode.py", "--model", "tiny", "--tokens", "6", "--runs", "1",
               "--group-size", "32", "--dtype", "float32")
    assert "| tiny |" in out and "| dense |" in out
    rec = json.loads(next(tmp_path.glob("decode_tiny_*.json")).read_text())
    assert rec["rows"][0]["tokens_per_s"] > 0 and rec["quantized_layers"] == 14
    # the CPU floor is a read's bandwidth (XLA:CPU's copy is far below the memory's speed)
    cpu = jax.default_backend() == "cpu"
    assert rec["bandwidth_measure"] == ("read (row sums)" if cpu else "copy (read + write)")
    assert rec["bandwidth_bytes_per_s"] > 1e8


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="profiles the CPU backend's loop")
def test_profile_decode_runs(tmp_path):
    out = _run(tmp_path, "profile_decode.py", "--model", "tiny", "--group-size", "32",
               "--tokens", "6")
    assert "| ffi_call |" in out and "kernel call q/k/v" in out
    rec = json.loads((tmp_path / "profile_decode_tiny_float32_cpu.json").read_text())
    assert rec["tokens_in_loop"] == 4 and rec["loop_ms_per_token"] > 0
    calls = {r["op"]: r["per_token"] for r in rec["ops"]}
    # the tiny model's layers, 4 kernel calls each (q/k/v and gate/up shared), every token
    assert calls["ffi_call"] == 4 * 2
    assert [c["call"] for c in rec["kernel_calls_per_layer"]] == ["q/k/v", "o", "gate/up",
                                                                   "down"]


@pytest.mark.slow
def test_decode_breakdown_runs(tmp_path):
    out = _run(tmp_path, "decode_breakdown.py", "--model", "tiny", "--group-size", "32",
               "--rounds", "1", "--steps", "2")
    assert "| any4 (CPU kernel) |" in out and "| head dense float32 (alone) |" in out
    rec = json.loads((tmp_path / "decode_breakdown_tiny_float32_cpu.json").read_text())
    assert [r["what"] for r in rec["rows"][:3]] == [
        "dense", "any4 (CPU kernel)", "any4, GEMVs replaced by zeros"]
    assert all(r.get("step_ms", r.get("ms", 0)) > 0 for r in rec["rows"])


@pytest.mark.slow
def test_bench_moe_runs(tmp_path):
    out = _run(tmp_path, "bench_moe.py", "--hidden", "64", "--ffn", "128", "--layers", "2",
               "--experts", "4", "--vocab", "256", "--seq-len", "128", "--tokens", "4",
               "--runs", "1")
    assert "| grouped by expert |" in out and "| any4 g64 |" in out
    rec = json.loads(next(tmp_path.glob("moe_*.json")).read_text())
    assert rec["eval"]["max_abs_logit_difference"] < 1e-5 and rec["decode"]["float32"] > 0


def test_tuner_descends_to_the_fastest_valid_config():
    """The Pallas tuner's search (`kernel_bench.py tune`'s axes through `timing.descend`; no
    GPU: a synthetic timing model): coordinate descent over the lookup variant, split K, bn,
    bk, warps and stages; invalid combinations are never timed, failures are skipped, and each
    variant's time at the start is recorded."""
    axes = runpy.run_path(_script("kernel_bench.py"))["AXES"]
    n, k, g, m = 14336, 4096, 128, 1
    start = default_config(m=m, n=n, k=k, g=g)
    valid = lambda cfg: not cfg.problems(n=n, k=k, g=g)
    timed_cfgs = []

    def timed(cfg):  # fastest: gather+post, split 2, bn 32, bk 128, 8 warps, 2 stages
        timed_cfgs.append(cfg)
        if cfg.num_stages == 4:
            return None  # "Triton cannot compile it"
        t = {"select": 30, "gather": 20}[cfg.lookup] - 5 * cfg.post_scale
        t += abs(cfg.split_k - 2) + abs(cfg.bn - 32) / 32 + abs(cfg.bk - 128) / 64
        return (t - (cfg.num_warps == 8) - (cfg.num_stages == 2)) * 1e-6

    best, t, variants = descend(start, axes, timed, valid, lambda: False)
    assert (best.lookup, best.post_scale, best.split_k, best.bn, best.bk, best.num_warps,
            best.num_stages) == ("gather", True, 2, 32, 128, 8, 2)
    assert t == pytest.approx(13e-6)
    assert set(variants) == {"select", "gather", "gather+post"}
    assert variants["gather+post"] < variants["gather"] < variants["select"]
    assert all(valid(c) for c in timed_cfgs) and all(g % c.bk == 0 for c in timed_cfgs)
    assert len(timed_cfgs) == len(set(timed_cfgs))  # each configuration timed once
    # a spent budget still times the variants, nothing else
    timed_cfgs.clear()
    descend(start, axes, timed, valid, lambda: True)
    assert len(timed_cfgs) == 3


@pytest.mark.slow
def test_tuner_runs_and_writes_a_table(tmp_path):
    """`kernel_bench.py tune` end to end in --smoke mode (Pallas' interpreter, untimed): the
    search, the crossover and the table it merges into (written whole, then renamed)."""
    table = tmp_path / "tuning.json"
    table.write_text(json.dumps({"entries": {"1x1:g32:m16": {"bm": 16}}}))
    args = [sys.executable, _script("kernel_bench.py"), "tune", "--smoke", "--shapes",
            "32x256", "--group-size", "64", "--buckets", "16", "--reps", "1", "--write"]
    r = subprocess.run(args + ["--table", str(table)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    entries = json.loads(table.read_text())["entries"]
    assert "1x1:g32:m16" in entries  # merged, not replaced
    entry = entries["32x256:g64:m16"]
    assert set(FIELDS) <= set(entry) and entry["us"] > 0
    assert set(entry["variants_us"]) == {"select", "gather", "gather+post"}
    assert entries["32x256:dense_threshold"] in (16, 32, 64, 128, 256)
    assert not list(tmp_path.glob("*.tmp"))
    # smoke figures never go into the package's own table
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode != 0 and "give --table PATH" in r.stderr


def test_sass_count_reads_the_main_loop(tmp_path):
    """`sass_count.py cuda`: the longest backward branch of each matching kernel, counted by
    opcode, per 4-bit code (16 per 8-byte code load)."""
    body = ["LDC R1, c[0x0][0x28] ;", "LDG.E.64 R2, desc[UR4][R4.64] ;",
            "LOP3.LUT R5, R2, 0xf, RZ, 0xc0, !PT ;", "@P0 FFMA R6, R5, R5, R6 ;",
            "@P0 BRA 0x10 ;", "EXIT ;"]
    sass = tmp_path / "sass.txt"
    sass.write_text("\n\tcode for sm_90a\n\t\tFunction : _Z15lut_gemm_kernelv\n"
                    + "".join(f"        /*{16 * i:04x}*/  {ln}\n" for i, ln in enumerate(body))
                    + "\t\tFunction : _Z5otherv\n        /*0000*/  EXIT ;\n")
    r = subprocess.run([sys.executable, _script("sass_count.py"), "cuda", str(sass)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == [
        "_Z15lut_gemm_kernelv",
        "  loop 4 instructions, 16 codes/lane, per code 0.25: LDG 1, LOP3 1, FFMA 1, BRA 1"]


def test_sass_count_captures_the_pallas_triton_ir():
    """`sass_count.py pallas`'s first half (no Triton needed): the Triton IR that Pallas
    lowers for CUDA, captured as text through a private jax function that an upgrade may
    move."""
    from any4_jax.kernels.pallas_gpu import VARIANTS
    from any4_jax.kernels.tuning import PallasConfig

    triton_ir = runpy.run_path(_script("sass_count.py"))["triton_ir"]
    cfg = PallasConfig(bm=16, bn=32, bk=64, num_warps=4, num_stages=2,
                       **VARIANTS["gather+post"])
    ir = triton_ir(64, 512, 1, 64, "any4", cfg)
    assert "tt.func" in ir and "tt.dot" in ir and "tt.load" in ir
    assert "scf.for" in ir  # the K loop whose SASS the script counts
