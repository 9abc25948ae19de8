"""Quantize one 28672 x 8192 (Llama-3-70B gate/up) bf16 matrix: time and peak process memory
(the chunked k-means keeps the working set bounded).

    python scripts/check_large_matrix.py
"""

import resource
import time

import jax.numpy as jnp
import numpy as np

from any4_jax import QuantConfig, quantize_weight


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def main():
    w = np.random.default_rng(0).standard_normal((28672, 8192), dtype=np.float32)
    w = jnp.asarray(w).astype(jnp.bfloat16)
    w.block_until_ready()
    base = _peak_gb()
    t = time.time()
    qw, info = quantize_weight(w, QuantConfig(format="any4", group_size=128), return_info=True)
    qw.codes.block_until_ready()
    print(f"28672x8192 bf16 any4: {time.time() - t:.1f} s, {info}, peak RSS {_peak_gb():.2f} GB "
          f"(after building the input: {base:.2f} GB)")


if __name__ == "__main__":
    main()
