"""Build the CUDA FFI library against the installed jaxlib: `python -m any4_jax.native.build_cuda`.

`pip install .` builds the same library through CMake (CMakeLists.txt, scikit-build-core); this
module calls nvcc directly, for a quick rebuild in a source checkout (it writes
`any4_jax/_lib/libany4_cuda.so`, which the loader finds) and for CI: `--check` compiles for
sm_80 and sm_90a without installing, so a syntax or API error fails CI on CPU machines.
Without nvcc it says so and exits 0: CPU users lose nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jaxlib

from any4_jax.native import sources
from any4_jax.native.sources import CUDA_HEADERS, CUDA_SOURCES, source_hash

ARCHS = ["80", "90a"]  # the same as CMakeLists.txt's ANY4_JAX_CUDA_ARCHS


def nvcc_command(out: str, include: str) -> list[str]:
    cmd = ["nvcc", "-std=c++17", "-O3", "--threads", "0", "-Xcompiler", "-fPIC", "-shared",
           "-I", include,
           "-I", os.path.join(sources.ROOT, "ffi_kernels"),
           f"-DANY4_SOURCES_SHA256={source_hash()}", f"-DANY4_JAXLIB_VERSION={jaxlib.__version__}"]
    for a in ARCHS:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return cmd + [os.path.join(sources.ROOT, s) for s in CUDA_SOURCES] + ["-o", out]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compile only, install nothing")
    ap.add_argument("--out", default=os.path.join(sources.ROOT, "any4_jax", "_lib",
                                                  sources.CUDA_LIB_NAME))
    args = ap.parse_args(argv)
    if shutil.which("nvcc") is None:
        print("nvcc not found: the CUDA kernels are not built; lut_matmul uses the Pallas or "
              "XLA paths", file=sys.stderr)
        return 0
    if source_hash() is None:
        print(f"the CUDA sources ({', '.join(CUDA_SOURCES + CUDA_HEADERS)}) are not under "
              f"{sources.ROOT}: this is an installed wheel, not a source checkout. Build from "
              "the source tree instead (`pip install --no-build-isolation .` there, with nvcc "
              "present).",
              file=sys.stderr)
        return 2
    include = jax.ffi.include_dir()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "libany4_cuda.so")
        cmd = nvcc_command(out, include)
        print(" ".join(cmd), file=sys.stderr)
        r = subprocess.run(cmd, capture_output=True, text=True)
        errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
        if r.returncode:
            print(r.stderr[-4000:], file=sys.stderr)
            return r.returncode
        if errors:
            print("\n".join(errors), file=sys.stderr)
        if not args.check:
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            shutil.copy(out, args.out + ".tmp")
            os.replace(args.out + ".tmp", args.out)
            print(f"built {args.out}", file=sys.stderr)
        else:
            print(f"compiled {', '.join(CUDA_SOURCES)} for sm_{', sm_'.join(ARCHS)}: ok",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
