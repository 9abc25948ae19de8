"""Instruction counts of a LUT GEMM kernel's main loop, from its SASS (no GPU needed).

    python scripts/sass_count.py cuda SASS_FILE [NAME_SUBSTRING ...]
    python scripts/sass_count.py pallas --triton-python PY [--shape 14336x4096] [--m 1]
        [--group-size 128] [--config '{"bn": 64, "bk": 128, "num_warps": 4, "num_stages": 3}']
        [--variants select,select+post,gather,gather+post,pair+post] [--keep DIR]

Both take the longest backward branch of a kernel as its main loop (the K loop) and count its
instructions by opcode. The time floor of a kernel that issues I instructions per weight is
about I x 58.7 M weights / (132 SMs x 4 schedulers x 1.8 GHz x 32 lanes) = I x 1.9 us on
Llama-3-8B gate/up (docs/cuda_kernel_notes.md). A static count, not a timing: it ranks
kernels by issue cost only.

cuda: the CUDA library's kernels, from a disassembly made with
    pip download --no-deps nvidia-cuda-cuobjdump   # cuobjdump, if the CUDA install lacks it
    nvcc -std=c++17 -O3 -cubin -gencode arch=compute_90a,code=sm_90a -I ffi_kernels \\
        ffi_kernels/bench/lut_gemm_bench.cu -o /tmp/bench.cubin
    cuobjdump -sass /tmp/bench.cubin > /tmp/sass.txt
For each kernel whose mangled name contains a given substring (default: every
`lut_gemm_kernel`), "per code" divides the loop by the 4-bit codes a lane dequantizes in it
(16 per 8-byte code load, LDG.E.64).

pallas: the Pallas kernel for an H100, per lookup variant. Pallas lowers the kernel to Triton
IR here (as `jax.export(..., platforms=["cuda"])` does); the IR is captured as text, compiled
for sm_90 by a Triton install (Triton's own ptxas; no GPU needed) and disassembled with
Triton's cuobjdump. "per weight" is loop instructions x 32 lanes x num_warps / (BN x BK):
thread-instructions issued per 4-bit weight; the registers per thread are printed too.
Triton runs in its own interpreter (`--triton-python`, e.g. after
`python -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install triton==3.6.0`) so that the
project's environment needs nothing more; the pip Triton reads the text IR of jaxlib's Triton
(seen to work: jax 0.10.2 with triton 3.6.0). The IR is captured through a private jax
function (`jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module`): a jax upgrade may
move it. Writes counts.json (and the .ttir, .cubin, .sass files) to --keep or a temporary
directory.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def functions(text: str) -> dict[str, list[str]]:
    """cuobjdump -sass output -> {function name: its instruction lines}."""
    out = {}
    for block in re.split(r"\n\s*Function : ", text)[1:]:
        name, _, body = block.partition("\n")
        out[name.strip()] = [ln for ln in body.split("\n")
                             if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    return out


def main_loop(lines: list[str]) -> list[str]:
    """The instructions of the longest backward branch (the main loop); [] if none."""
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", ln)[1], 16) for ln in lines]
    best = None
    for i, ln in enumerate(lines):
        m = re.search(r"BRA\s+0x([0-9a-f]+)", ln)
        if m and int(m[1], 16) < addr[i] and int(m[1], 16) in addr:
            j = addr.index(int(m[1], 16))
            if best is None or i - j > best[1] - best[0]:
                best = (j, i)
    return lines[best[0]:best[1] + 1] if best else []


def opcode(line: str) -> str:
    ins = re.sub(r"/\*[0-9a-f]{4}\*/", "", line).strip().split(";")[0]
    ins = re.sub(r"^@!?U?P\w+\s+", "", ins)
    return ins.split()[0].split(".")[0] if ins else ""


def top(counts: dict[str, int], n: int = 8) -> str:
    """The first n opcodes of {opcode: count} (most common first) as text."""
    return ", ".join(f"{op} {c}" for op, c in list(dict(counts).items())[:n])


# --- cuda ----------------------------------------------------------------------------------

def cuda(args, ap):
    with open(args.sass) as fh:
        funcs = functions(fh.read())
    for name, lines in funcs.items():
        if not any(s in name for s in args.names):
            continue
        body = main_loop(lines)
        counts = collections.Counter(opcode(ln) for ln in body)
        codes = 16 * sum(1 for ln in body if "LDG.E.64" in ln)
        per = f"{len(body) / codes:.2f}" if codes else "-"
        print(f"{name}\n  loop {len(body)} instructions, {codes} codes/lane, per code {per}: "
              + top(dict(counts.most_common())))


# --- pallas --------------------------------------------------------------------------------

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
    """The Pallas kernel's Triton IR (text) for x [m, k] bf16, an [n, k] weight and a
    `PallasConfig`."""
    import jax
    import jax.numpy as jnp
    from jax import export
    from jax._src.pallas.triton import pallas_call_registration as reg

    from any4_jax.kernels.pallas_gpu import lut_matmul_pallas
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
    pairs = jax.ShapeDtypeStruct((n, 256), jnp.uint32) if config.lookup == "pair" else None
    f = jax.jit(lambda x, q, p: lut_matmul_pallas(x, q, config=config, pairs=p))
    reg.lowering.lower_jaxpr_to_triton_module = capture
    try:
        with _abstract_h100():
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
    import jax

    if not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                      platform="cuda")
    return jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev))


def count(sass: str, config) -> dict:
    """The loop's instruction count, per weight (config: the `PallasConfig`) and by opcode."""
    body = main_loop(next(iter(functions(sass).values())))
    ops = collections.Counter(opcode(ln) for ln in body)
    per = len(body) * 32 * config.num_warps / (config.bn * config.bk)
    return {"loop_instructions": len(body), "per_weight": per, "opcodes": dict(ops.most_common())}


def pallas(args, ap):
    from any4_jax.kernels.pallas_gpu import VARIANTS
    from any4_jax.kernels.tuning import PallasConfig

    n, k = map(int, args.shape.split("x"))
    try:
        base = PallasConfig(**{"bm": 16, **json.loads(args.config)})
    except (TypeError, ValueError) as e:
        ap.error(f"--config {args.config}: {e}")
    problems = base.problems(n=n, k=k, g=args.group_size)
    if problems:
        ap.error(f"--config {args.config} cannot run --shape {args.shape}: "
                 + "; ".join(problems))
    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="pallas_sass_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in (args.variants or ",".join(VARIANTS)).split(","):
        if name not in VARIANTS:
            ap.error(f"--variants: unknown {name!r}; choose from {', '.join(VARIANTS)}")
        cfg = base.replace(**VARIANTS[name])
        stem = out_dir / name.replace("+", "_")
        Path(f"{stem}.ttir").write_text(
            triton_ir(n, k, args.m, args.group_size, args.format, cfg))
        res = subprocess.run([args.triton_python, "-c", _COMPILE, f"{stem}.ttir",
                              str(cfg.num_warps), str(cfg.num_stages)],
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
        r = results[name] = {**count(sass, cfg), "registers": regs, "config": cfg.to_dict()}
        print(f"{name:12s} {r['per_weight']:5.2f} instructions/weight "
              f"(loop {r['loop_instructions']}, {regs} registers): {top(r['opcodes'])}")
    (out_dir / "counts.json").write_text(json.dumps(
        {"shape": args.shape, "m": args.m, "group_size": args.group_size, "format": args.format,
         "results": results,
         "command": "python scripts/sass_count.py " + " ".join(sys.argv[1:])}, indent=1))
    print(f"files in {out_dir}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="`MODE --help` for each mode's options")
    modes = ap.add_subparsers(dest="mode", required=True)
    p = modes.add_parser("cuda", help="the CUDA library's kernels, from a cuobjdump -sass file")
    p.set_defaults(run=cuda)
    p.add_argument("sass", help="cuobjdump -sass output (see this script's docstring)")
    p.add_argument("names", nargs="*", default=["lut_gemm_kernel"],
                   help="count the kernels whose mangled name contains one of these")
    p = modes.add_parser("pallas", help="the Pallas kernel per lookup variant (needs a Triton "
                                        "install, not a GPU)")
    p.set_defaults(run=pallas)
    p.add_argument("--triton-python", required=True,
                   help="a Python with `triton` installed (see this script's docstring)")
    p.add_argument("--shape", default="14336x4096", help="N x K (default Llama-3-8B gate_up)")
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--format", default="any4", choices=("any4", "int4"))
    p.add_argument("--config", default='{"bn": 64, "bk": 128, "num_warps": 4, '
                                       '"num_stages": 3}',
                   help="PallasConfig fields as JSON (bm defaults to 16); each variant sets "
                        "lookup and post_scale")
    p.add_argument("--variants", default=None,
                   help="comma-separated lookup variants (default: all of pallas_gpu.VARIANTS)")
    p.add_argument("--keep", help="directory to keep the .ttir, .cubin and .sass files in")
    args = ap.parse_args()
    args.run(args, ap)


if __name__ == "__main__":
    main()
