"""Instruction counts of the Pallas kernel's main loop for an H100, without a GPU.

    python -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install triton==3.6.0   # once
    python scripts/pallas_sass.py --triton-python /tmp/tvenv/bin/python \\
        [--shape 14336x4096] [--m 1] [--group-size 128] \\
        [--config '{"bn": 64, "bk": 128, "num_warps": 4, "num_stages": 3}'] \\
        [--variants select,select+post,gather,gather+post] [--keep DIR]

Pallas lowers the kernel to Triton IR here (as `jax.export(..., platforms=["cuda"])` does);
this script captures that IR as text, has a Triton install compile it for sm_90 (Triton's
own ptxas; no GPU needed), disassembles the cubin with Triton's cuobjdump and counts the
instructions of the longest loop (the K loop, `sass_count.py`). "per weight" is
loop instructions x 32 lanes x num_warps / (BN x BK): thread-instructions issued per 4-bit
weight, whose time floor on Llama-3-8B gate/up is about 1.9 us per instruction per weight
(132 SMs x 4 schedulers x ~1.8 GHz x 32 lanes; docs/cuda_kernel_notes.md). Also prints the
registers per thread. A static count, not a timing: it ranks lookups by issue cost only.

Triton runs in its own interpreter (`--triton-python`) so that the project's environment
needs nothing more; the pip Triton reads the text IR of jaxlib's Triton (versions seen to
work: jax 0.10.2 with triton 3.6.0). The IR is captured through a private jax function
(`jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module`): a jax upgrade may move it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import sass_count  # noqa: E402

from any4_jax.kernels.pallas_gpu import VARIANTS  # noqa: E402

_COMPILE = r"""
import sys, triton
from triton.backends.compiler import GPUTarget
src, nw, ns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": nw, "num_stages": ns})
open(src[:-5] + ".cubin", "wb").write(k.asm["cubin"])
import os
print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
"""


def triton_ir(n, k, m, g, fmt, config) -> str:
    """The kernel's Triton IR (text) for x [m, k] bf16 and an [n, k] weight."""
    import jax
    import jax.numpy as jnp
    from jax import export
    from jax._src.pallas.triton import pallas_call_registration as reg

    from any4_jax.kernels import pallas_gpu
    from any4_jax.quant.qweight import random_qweight

    captured = []
    orig = reg.lowering.lower_jaxpr_to_triton_module

    def capture(*a, **kw):
        out = orig(*a, **kw)
        captured.append(out.module.operation.get_asm(enable_debug_info=False))
        return out

    qw = jax.eval_shape(lambda: random_qweight(jax.random.key(0), n, k, fmt=fmt,
                                               group_size=g))
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    # the pair lookup reads a prepared pair table (an argument, like the weight)
    pairs = (jax.ShapeDtypeStruct((n, 256), jnp.uint32) if config.get("lookup") == "pair"
             else None)
    f = jax.jit(lambda x, q, p: pallas_gpu.lut_matmul_pallas(x, q, config=config, pairs=p))
    reg.lowering.lower_jaxpr_to_triton_module = capture
    try:
        ctx = _abstract_h100()
        with ctx:
            export.export(f, platforms=["cuda"], disabled_checks=[
                export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(x, qw, pairs)
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = orig
    if not captured:
        sys.exit("no Triton module was lowered (did the kernel decline this shape?)")
    return captured[-1]


def _abstract_h100():
    """jax >= 0.11 asks the lowering for the target GPU even when exporting (see the export
    test in tests/kernels/test_pallas.py)."""
    import contextlib

    import jax

    if not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                      platform="cuda")
    return jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev))


def count(sass: str, config: dict) -> dict:
    funcs = sass_count.functions(sass)
    lines = next(iter(funcs.values()))
    body = sass_count.main_loop(lines)
    ops = collections.Counter(sass_count.opcode(ln) for ln in body)
    per = len(body) * 32 * config["num_warps"] / (config["bn"] * config["bk"])
    return {"loop_instructions": len(body), "per_weight": per, "opcodes": dict(ops.most_common())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--triton-python", required=True,
                    help="a Python with `triton` installed (see the docstring)")
    ap.add_argument("--shape", default="14336x4096", help="N x K (default Llama-3-8B gate_up)")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--format", default="any4", choices=("any4", "int4"))
    ap.add_argument("--config", default='{"bn": 64, "bk": 128, "num_warps": 4, '
                                        '"num_stages": 3}')
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--keep", help="directory to keep the .ttir, .cubin and .sass files in")
    args = ap.parse_args()
    n, k = map(int, args.shape.split("x"))
    base = {"bm": 16, **json.loads(args.config)}
    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="pallas_sass_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            ap.error(f"--variants: unknown {name!r}; choose from {', '.join(VARIANTS)}")
        cfg = {**base, **VARIANTS[name]}
        stem = out_dir / name.replace("+", "_")
        Path(f"{stem}.ttir").write_text(
            triton_ir(n, k, args.m, args.group_size, args.format, cfg))
        res = subprocess.run([args.triton_python, "-c", _COMPILE, f"{stem}.ttir",
                              str(cfg["num_warps"]), str(cfg["num_stages"])],
                             capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"Triton could not compile {stem}.ttir:\n{res.stderr[-3000:]}")
        cuobjdump = res.stdout.strip().splitlines()[-1]
        sass = subprocess.run([cuobjdump, "-sass", f"{stem}.cubin"], capture_output=True,
                              text=True, check=True).stdout
        Path(f"{stem}.sass").write_text(sass)
        usage = subprocess.run([cuobjdump, "-res-usage", f"{stem}.cubin"],
                               capture_output=True, text=True, check=True).stdout
        regs = next((int(t[4:]) for t in usage.split() if t.startswith("REG:")), None)
        results[name] = {**count(sass, cfg), "registers": regs, "config": cfg}
        r = results[name]
        top = ", ".join(f"{op} {c}" for op, c in list(r["opcodes"].items())[:8])
        print(f"{name:12s} {r['per_weight']:5.2f} instructions/weight "
              f"(loop {r['loop_instructions']}, {regs} registers): {top}")
    (out_dir / "counts.json").write_text(json.dumps(
        {"shape": args.shape, "m": args.m, "group_size": args.group_size, "format": args.format,
         "results": results,
         "command": "python scripts/pallas_sass.py " + " ".join(sys.argv[1:])}, indent=1))
    print(f"files in {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
