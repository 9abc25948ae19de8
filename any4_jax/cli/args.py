"""Argument parsing shared by the subcommands: group sizes, formats, overrides, the model and
kernel arguments. Each parser raises argparse's error with the flag and the accepted forms."""

from __future__ import annotations

import argparse

from any4_jax.kernels.api import KNOWN as KERNEL_NAMES
from any4_jax.ptq.quantize_model import DEFAULT_EXCLUDE
from any4_jax.quant.config import KMEANS_INITS, KMEANS_METHODS, SAMPLE_WEIGHTINGS
from any4_jax.quant.formats import FORMAT_NAMES, parse_format

DTYPES = ("auto", "float32", "bfloat16", "float16")
KERNELS = ("auto", *KERNEL_NAMES)
# SmolLM2-135M's hidden size is 576 = 9 x 64, which 128 (the library's default,
# QuantConfig.group_size) does not divide: the model commands default to 64 so the embedded
# model quantizes as it is; `quantize-matrix` keeps the library's default.
MODEL_GROUP_SIZE = 64
OVERRIDE_KEYS = ("format", "group_size", "symmetric", "sample_weighting", "dtype")


def _number(text: str, kind: type, ok, rule: str):
    """`text` as `kind` (int or float) if `ok(value)`, else argparse's error saying `rule`."""
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"{text} must be {rule}")
    return v


def positive_int(text: str) -> int:
    """An integer >= 1 (counts and lengths)."""
    return _number(text, int, lambda v: v >= 1, "at least 1")


def nonnegative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "0 or more")


def nonnegative_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")


def probability(text: str) -> float:
    """A number in (0, 1] (top-p)."""
    return _number(text, float, lambda v: 0 < v <= 1, "in (0, 1]")


def group_size(text: str, *, flag: str = "--group-size") -> int | None:
    """An integer, or "row" / "none" for one group per row (None)."""
    if text.strip().lower() in ("row", "none"):
        return None
    try:
        g = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: an integer or 'row'") from e
    if g < 1:
        raise argparse.ArgumentTypeError(f"{flag} {g}: must be positive")
    return g


def formats(text: str) -> list[str]:
    """A comma-separated list of format names, each checked."""
    names = [t for t in (s.strip() for s in text.split(",")) if t]
    for n in names:
        try:
            parse_format(n)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
    return names


def override(text: str) -> tuple[str, dict]:
    """'PATTERN:key=value[,key=value]' -> (pattern, {key: value})."""
    pattern, sep, rest = text.partition(":")
    if not sep or not rest:
        raise argparse.ArgumentTypeError(
            f"--override {text!r}: expected PATTERN:key=value[,key=value], e.g. "
            "'down_proj:group_size=128'")
    changes: dict = {}
    for item in rest.split(","):
        k, eq, v = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(
                f"--override {text!r}: {item!r} is not key=value (expected "
                "PATTERN:key=value[,key=value], e.g. 'down_proj:group_size=128')")
        k = k.strip().replace("-", "_")
        if k == "group_size":
            changes[k] = group_size(v, flag=f"--override {text!r}: group_size")
        elif k == "symmetric":
            if v.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise argparse.ArgumentTypeError(
                    f"--override {text!r}: symmetric={v!r} is not true or false")
            changes[k] = v.lower() in ("1", "true", "yes")
        elif k in OVERRIDE_KEYS:
            changes[k] = v
        else:
            raise argparse.ArgumentTypeError(
                f"--override {text!r}: unknown key {k!r} ({', '.join(OVERRIDE_KEYS)})")
    return pattern, changes


def add_model(p, *, kernel: bool = True) -> None:
    """The positional model and --dtype (and --kernel where quantized layers run)."""
    p.add_argument("model", nargs="?", default=None,
                   help="a .gguf file, a Hugging Face directory or an any4 checkpoint "
                        "(default: the embedded SmolLM2-135M-Instruct, see `any4 fetch`)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="parameter dtype (auto: float32 for GGUF, the checkpoint's own for HF)")
    if kernel:
        add_kernel(p)


def add_kernel(p) -> None:
    p.add_argument("--kernel", choices=KERNELS, default="auto",
                   help="matmul implementation of quantized layers (auto: the best verified "
                        "one for this machine; see `lut_matmul`); for cuda, "
                        "$ANY4_JAX_CUDA_KERNEL picks the library's kernel (scaled, unit_pair, "
                        "unit_lane)")


def add_quant_settings(p) -> None:
    """The QuantConfig / KMeansConfig fields of `any4 quantize`."""
    p.add_argument("--format", default="any4", choices=FORMAT_NAMES)
    p.add_argument("--group-size", type=group_size, default=MODEL_GROUP_SIZE,
                   help=f"elements per group along K, or 'row' (default {MODEL_GROUP_SIZE}: "
                        "the library's 128 does not divide SmolLM2's hidden size 576)")
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--sample-weighting", choices=SAMPLE_WEIGHTINGS,
                   default="activations_x_scales")
    p.add_argument("--kmeans-method", choices=KMEANS_METHODS, default=None,
                   help="optimal (default): the exact weighted k-means of each row; lloyd: "
                        "k-means++ and Lloyd iterations, a local optimum (also what "
                        "--init/--max-iter/--tol/--seed ask for)")
    p.add_argument("--method", choices=("rtn", "gptq", "awq"), default="rtn",
                   help="rtn: each weight to its nearest table entry (default); gptq: GPTQ's "
                        "codes against the same tables and scales, with inverse-Hessian error "
                        "feedback; awq: per-input-channel scales searched on the calibration "
                        "activations and folded into the preceding norm/projection, then rtn "
                        "(gptq and awq need calibration; sequential)")
    p.add_argument("--awq-grid", type=nonnegative_int, default=20,
                   help="AWQ: alphas searched in [0, 1) (20)")
    p.add_argument("--percdamp", type=nonnegative_float, default=0.01,
                   help="GPTQ dampening: this fraction of the mean Hessian diagonal (0.01)")
    p.add_argument("--act-order", action="store_true",
                   help="GPTQ: columns in order of decreasing Hessian diagonal")
    p.add_argument("--gptq-block", type=nonnegative_int, default=128,
                   help="GPTQ: columns per lazy-batch block (128)")
    p.add_argument("--init", choices=KMEANS_INITS, default="kmeans++")
    p.add_argument("--max-iter", type=nonnegative_int, default=300)
    p.add_argument("--tol", type=nonnegative_float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)


def add_calibration(p) -> None:
    p.add_argument("--calibration", default="prompt",
                   help="prompt (default: the built-in diverse prompt), none, or a text source "
                        "(sensesensibility, a file path) for random windows")
    p.add_argument("--calib-mode", choices=("sequential", "offline"), default="sequential")
    p.add_argument("--statistic", choices=("abs_of_mean", "mean_of_abs"), default="abs_of_mean")
    p.add_argument("--num-samples", type=positive_int, default=128,
                   help="windows of a calibration text (default 128)")
    p.add_argument("--calib-seq-len", type=positive_int, default=512,
                   help="tokens per calibration window (default 512)")
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--calib-batch-size", type=positive_int, default=16,
                   help="calibration windows per forward (memory bound; under --distributed "
                        "the batches are shared out over the processes; default 16)")


def add_layer_selection(p, *, overrides: bool = False) -> None:
    p.add_argument("--include", action="append", help="fnmatch pattern of layers to quantize "
                   "(repeatable; default all)")
    p.add_argument("--exclude", action="append", default=None,
                   help="pattern of layers to skip (repeatable; default lm_head)")
    if overrides:
        p.add_argument("--override", action="append", type=override,
                       help="per-layer settings, e.g. 'down_proj:group_size=128' (repeatable)")


def fix_defaults(args) -> None:
    """Defaults argparse cannot express: --exclude's default is replaced, not appended to."""
    if getattr(args, "exclude", "unset") is None:
        args.exclude = list(DEFAULT_EXCLUDE)
