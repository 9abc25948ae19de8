"""Instruction counts of the CUDA LUT GEMM's main loop, from its SASS (no GPU needed).

    pip download --no-deps nvidia-cuda-cuobjdump   # cuobjdump, if the CUDA install lacks it
    nvcc -std=c++17 -O3 -cubin -gencode arch=compute_90a,code=sm_90a -I ffi_kernels \\
        ffi_kernels/bench/lut_gemm_bench.cu -o /tmp/bench.cubin
    cuobjdump -sass /tmp/bench.cubin > /tmp/sass.txt
    python scripts/sass_count.py /tmp/sass.txt [NAME_SUBSTRING ...]

For each kernel whose mangled name contains a given substring (default: every
`lut_gemm_kernel`), the longest backward branch is taken as the main loop and its
instructions are counted by opcode; "per code" divides by the 4-bit codes a lane dequantizes
in that loop (16 per 8-byte code load, LDG.E.64). The time floor of a kernel that issues I
instructions per weight is about I x 58.7 M weights / (132 SMs x 4 x 1.8 GHz x 32 lanes)
= I x 1.9 us on Llama-3-8B gate/up (docs/cuda_kernel_notes.md).
"""

from __future__ import annotations

import argparse
import collections
import re


def functions(text: str) -> dict[str, list[str]]:
    out = {}
    for block in re.split(r"\n\s*Function : ", text)[1:]:
        name, _, body = block.partition("\n")
        out[name.strip()] = [ln for ln in body.split("\n")
                             if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    return out


def main_loop(lines: list[str]) -> list[str]:
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sass")
    ap.add_argument("names", nargs="*", default=["lut_gemm_kernel"])
    args = ap.parse_args()
    with open(args.sass) as fh:
        funcs = functions(fh.read())
    for name, lines in funcs.items():
        if not any(s in name for s in args.names):
            continue
        body = main_loop(lines)
        counts = collections.Counter(opcode(ln) for ln in body)
        codes = 16 * sum(1 for ln in body if "LDG.E.64" in ln)
        per = f"{len(body) / codes:.2f}" if codes else "-"
        top = ", ".join(f"{k} {v}" for k, v in counts.most_common(8))
        print(f"{name}\n  loop {len(body)} instructions, {codes} codes/lane, per code {per}: {top}")


if __name__ == "__main__":
    main()
