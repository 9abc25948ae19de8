"""Real Llama weight shapes (N x K = out_features x in_features), docs/design.md s.6.

Shared by tests, benchmarks and kernel tuning so that they all talk about the same matrices.
"""

LLAMA_SHAPES: dict[str, tuple[int, int]] = {
    "llama3-8b/qkv": (6144, 4096),
    "llama3-8b/o": (4096, 4096),
    "llama3-8b/gate_up": (14336, 4096),
    "llama3-8b/down": (4096, 14336),
    "llama3-70b/qkv_o": (8192, 8192),
    "llama3-70b/gate_up": (28672, 8192),
    "llama3-70b/down": (8192, 28672),
    "llama3.2-1b/o": (2048, 2048),
    "llama3.2-1b/gate_up": (8192, 2048),
    "llama3.2-1b/down": (2048, 8192),
}

# The three matrices of the quantization-speed benchmark (issue: quantization core).
QUANTIZE_BENCH_SHAPES: dict[str, tuple[int, int]] = {
    "4096x4096": (4096, 4096),
    "14336x4096": (14336, 4096),
    "4096x14336": (4096, 14336),
}
