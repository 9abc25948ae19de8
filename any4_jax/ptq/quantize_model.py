"""Quantize a whole model: every selected Dense-like layer becomes a `QuantDense`.

`quantize_model(model, config, calibration=..., tokens=...)` returns a new model (the input is
left as it was; unchanged arrays are shared, not copied). Layers are selected by dotted path
(`layers.3.self_attn.q_proj`) with fnmatch patterns; a bare name like `lm_head` or `down_proj`
matches that last component anywhere. Defaults: every decoder Dense, `lm_head` and MoE routers
(`block_sparse_moe.gate`) excluded; an embedding is never a Dense, so it is never touched (tied
embeddings stay tied). Stacked experts (`block_sparse_moe.experts.w1`, ...) are quantized as
one [E*N, K] matrix each (experts are just more rows), each expert's rows weighted by the
statistics of the tokens routed to it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from any4_jax import distributed
from any4_jax.nn.bcqdense import BCQDense
from any4_jax.nn.layers import dense_layers, get_layer, num_experts, set_layer, weight_rows
from any4_jax.nn.qdense import QuantDense, QuantState
from any4_jax.nn.qexperts import QuantExpertDense
from any4_jax.ptq.awq import AWQConfig, apply_awq
from any4_jax.ptq.bcq import check_bcq
from any4_jax.ptq.calibrate import (
    CalibrationConfig,
    call_groups,
    collect_offline,
    finalize,
    fold_batches,
    group_by_block,
    my_batches,
    run_block,
    uncalibrated_experts,
)
from any4_jax.ptq.rows import quantize_rows
from any4_jax.quant.act_quant import ActQuantConfig
from any4_jax.quant.bcq_codebooks import BCQCodebooks
from any4_jax.quant.config import QuantConfig
from any4_jax.quant.gptq import GPTQConfig, gptq_quantize

DEFAULT_EXCLUDE = ("lm_head", "block_sparse_moe.gate")
METHODS = ("rtn", "gptq", "awq")


def _match(path: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, f"*.{pattern}")


def select_layers(model, include: Sequence[str] = ("*",),
                  exclude: Sequence[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Dotted paths of the Dense layers to quantize (already-quantized ones are skipped).

    A default exclusion (`DEFAULT_EXCLUDE`) is lifted by an include pattern that names it:
    include=["*", "gate"] also quantizes the MoE routers, ["lm_head"] the output head."""
    lifted = {d for d in DEFAULT_EXCLUDE for p in include if p != "*" and _match(d, p)}
    exclude = [p for p in exclude if p not in lifted]
    out = []
    for path, layer in dense_layers(model):
        if isinstance(layer, QuantDense):
            continue
        if any(_match(path, p) for p in include) and not any(_match(path, p) for p in exclude):
            out.append(path)
    return out


def layer_configs(paths: list[str], config: QuantConfig,
                  overrides: Mapping[str, Mapping | QuantConfig] | None) -> dict[str, QuantConfig]:
    """Per-layer configs: `config`, then every matching override in order (later wins). An
    override that matches none of `paths` is an error (a typo would otherwise do nothing)."""
    overrides = dict(overrides or {})
    unused = [pat for pat in overrides if not any(_match(p, pat) for p in paths)]
    if unused:
        raise ValueError(f"override pattern(s) {unused} match none of the {len(paths)} layers "
                         f"being quantized (e.g. {paths[:3]}); fix the pattern or drop it")
    out = {}
    for p in paths:
        c = config
        for pattern, change in overrides.items():
            if _match(p, pattern):
                if isinstance(change, QuantConfig):
                    c = change
                elif isinstance(change, Mapping):
                    try:
                        c = c.replace(**dict(change))
                    except TypeError as e:  # an unknown field name
                        fields = ", ".join(f.name for f in dataclasses.fields(QuantConfig))
                        raise ValueError(f"override {pattern!r}: {e}; QuantConfig's fields "
                                         f"are {fields}") from None
                else:
                    raise TypeError(f"override {pattern!r}: expected a dict of QuantConfig "
                                    f"fields or a QuantConfig, got {type(change).__name__}")
        out[p] = c
    return out


def _check_group_sizes(model, cfgs: dict[str, QuantConfig]) -> None:
    """Every layer's group size against its K, all named at once, before any work."""
    bad = []
    for p, c in cfgs.items():
        k = get_layer(model, p).kernel.shape[-2]  # [K, N], or [E, K, N] for experts
        try:
            c.resolve_group_size(k, name=p)
        except ValueError:
            bad.append(f"{p} (K={k})")
    if bad:
        gs = sorted({c.group_size for c in cfgs.values() if c.group_size})
        raise ValueError(
            f"group size {gs} does not divide in_features of {len(bad)} layers: "
            f"{', '.join(bad)}. Choose a group size that divides every K (or 'row'), or give "
            "those layers their own group size with an override")


def needs_activations(cfgs: dict[str, QuantConfig]) -> bool:
    return any(c.uses_activation_stats for c in cfgs.values())


@dataclasses.dataclass
class LayerReport:
    path: str
    shape: tuple[int, int]
    format: str
    group_size: int
    seconds: float
    kmeans_iters_mean: float | None = None
    kmeans_iters_max: int | None = None
    # bcq: the weighted MSE of the codes (normalized units), local codebooks' fit iterations
    bcq: dict | None = None
    # the processes the rows were shared out over (jax.distributed; 1: quantized whole)
    processes: int = 1


@dataclasses.dataclass
class QuantReport:
    layers: list[LayerReport]
    calibration_seconds: float
    quantize_seconds: float
    total_seconds: float
    calibration_tokens: int
    mode: str  # "sequential" | "offline" | "stats" | "none"
    method: str = "rtn"  # "rtn" | "gptq" | "awq"
    # AWQ: the scale search's result per group of layers sharing an input
    awq: list[dict] = dataclasses.field(default_factory=list)
    # stacked-expert layers: the experts no calibration token was routed to (their rows were
    # quantized with uniform sample weights)
    uncalibrated_experts: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _quantize_one(layer, cfg: QuantConfig, xbar, path: str, hessian=None,
                  gptq: GPTQConfig | None = None, codebooks: BCQCodebooks | None = None,
                  act_quant: ActQuantConfig | None = None):
    w = weight_rows(layer)  # Flax [K, N] -> [N, K]; experts [E, K, N] -> [E*N, K]
    bcq = cfg.spec.family == "bcq"
    cb = codebooks.weights if bcq and codebooks is not None else None
    # under jax.distributed each process quantizes a share of the rows (ptq/rows.py)
    qw, info = quantize_rows(w, cfg, sample_weight=xbar, name=path, return_info=True,
                             codebooks=cb)
    if hessian is not None:  # GPTQ: the RTN tables, scales and zeros; codes with feedback
        qw = gptq_quantize(w, hessian, qw, gptq)
    if num_experts(layer):
        return QuantExpertDense(qw, num_experts(layer), act_quant=act_quant), info
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else bias[...]
    return (BCQDense if bcq else QuantDense)(qw, bias, act_quant=act_quant), info


def quantize_model(model, config: QuantConfig | None = None, *,
                   calibration: CalibrationConfig | None = None,
                   tokens: np.ndarray | None = None,
                   stats: Mapping[str, np.ndarray] | None = None,
                   include: Sequence[str] = ("*",), exclude: Sequence[str] = DEFAULT_EXCLUDE,
                   overrides: Mapping[str, Mapping | QuantConfig] | None = None,
                   method: str = "rtn", gptq: GPTQConfig | None = None,
                   awq: AWQConfig | None = None,
                   codebooks: BCQCodebooks | None = None,
                   act_quant: ActQuantConfig | None = None,
                   progress: bool = True, in_place: bool = False):
    """Returns (quantized model, QuantReport).

    method: "rtn" (round to nearest: each weight to its nearest table entry) or "gptq" (GPTQ's
    codes against the same tables and scales, with inverse-Hessian error feedback, `gptq`
    its settings; needs calibration tokens and runs sequentially, block by block, each layer's
    Hessian from the model with every earlier layer already quantized; stacked experts stay
    round-to-nearest); or "awq" (AWQ's per-input-channel scales, searched on the calibration
    activations with the layers' own quantization and folded into the preceding norm or
    projection, then round to nearest; `awq` its settings; sequential too).

    Activation statistics for any-n come from `stats` ({path: xbar [K]}, e.g. a file written
    by `any4 calibrate`), else from `tokens` ([n, t] calibration sequences, see
    `ptq.calibrate.calibration_tokens`) with `calibration` (mode, statistic, batch size). Formats
    that need none (int/nf4/fp4, any-n with sample_weighting="none") ignore both.

    codebooks: format "bcq": universal codebooks (`BCQCodebooks.load(path)`) for every bcq
    layer; None learns local codebooks per layer (`config.bcq_fit`).
    act_quant: an activation quantizer every quantized layer applies to its input (simulated
    W4A4, `ActQuantConfig`); None keeps activations as they are.

    in_place: replace the layers of `model` itself instead of a copy, so each dense kernel is
    freed as soon as its layer is quantized (peak memory: the model plus one layer, plus the
    calibration activations). The CLI uses it; library callers get a new model by default.
    """
    config = config or QuantConfig()
    calibration = calibration or CalibrationConfig()
    if method not in METHODS:
        raise ValueError(f"quantize_model: unknown method={method!r}; choose one of {METHODS}")
    if gptq is not None and not isinstance(gptq, GPTQConfig):
        raise TypeError(f"gptq must be a GPTQConfig, got {type(gptq).__name__}")
    if awq is not None and not isinstance(awq, AWQConfig):
        raise TypeError(f"awq must be an AWQConfig, got {type(awq).__name__}")
    if method != "rtn":
        if tokens is None:
            raise ValueError(f"method={method!r} needs calibration tokens (tokens=, see "
                             "calibration_tokens): it works on each layer's inputs")
        if calibration.mode != "sequential":
            raise ValueError(f"method={method!r} runs with sequential calibration (block by "
                             "block on the partly quantized model); use mode='sequential'")
    t_start = time.perf_counter()
    # a new object sharing the (immutable) arrays, unless asked to work in place
    new = model if in_place else nnx.merge(*nnx.split(model))
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}; e.g. "
                        "QuantConfig(**d) for a dict")
    if not isinstance(calibration, CalibrationConfig):
        raise TypeError(f"calibration must be a CalibrationConfig, got "
                        f"{type(calibration).__name__}")
    for name, value in (("include", include), ("exclude", exclude)):
        if isinstance(value, str):
            raise TypeError(f"{name} must be a list of patterns, got the string {value!r} "
                            f"(write [{value!r}])")
    paths = select_layers(new, include, exclude)
    if not paths:
        raise ValueError(f"no Dense layer matches include={list(include)} "
                         f"exclude={list(exclude)} (layers already quantized are skipped)")
    cfgs = layer_configs(paths, config, overrides)
    _check_group_sizes(new, {p: c for p, c in cfgs.items() if c.spec.family != "bcq"})
    check_bcq(new, cfgs, method, codebooks, act_quant)
    want_act = needs_activations(cfgs)
    if want_act and stats is None and tokens is None:
        raise ValueError("quantizing any-n or bcq with activation sample weights needs "
                         "calibration: pass tokens= "
                         "(see calibration_tokens) or stats=, or use sample_weighting='none'")
    if stats is not None:
        missing = [p for p in paths if cfgs[p].uses_activation_stats and p not in stats]
        if want_act and missing:
            raise ValueError(f"the calibration statistics lack {len(missing)} layers, e.g. "
                             f"{missing[:3]}; they were computed for another model")

    bar = tqdm(total=len(paths), desc="quantizing", unit="layer", disable=not progress)
    reports: list[LayerReport] = []
    calib_s = 0.0

    def do(path, xbar, hessian=None):
        t0 = time.perf_counter()
        bar.set_postfix_str(path, refresh=False)
        q, info = _quantize_one(get_layer(new, path), cfgs[path], xbar, path, hessian, gptq,
                                codebooks, act_quant)
        set_layer(new, path, q)
        jax.block_until_ready(q.codes.get_value())
        reports.append(LayerReport(path, tuple(q.meta.shape), q.format,
                                   q.group_size, time.perf_counter() - t0,
                                   info.get("kmeans_iters_mean"), info.get("kmeans_iters_max"),
                                   {k: info[k] for k in ("mse", "local", "fit_iters",
                                                         "fit_seconds") if k in info} or None,
                                   info.get("processes", 1)))
        bar.update(1)

    def xbar_for(path, table):
        c = cfgs[path]
        return table.get(path) if c.uses_activation_stats else None

    idle: dict[str, list[int]] = {}
    awq_report: list[dict] = []
    try:  # the bar is closed on an error or an interruption too (its line ends cleanly)
        n_tok = 0 if tokens is None else int(np.asarray(tokens).size)
        if method != "rtn":
            mode = "sequential"
            calib_s = _sequential(new, np.asarray(tokens), paths, calibration, do, xbar_for,
                                  idle, hessian=method == "gptq",
                                  awq=(awq or AWQConfig()) if method == "awq" else None,
                                  cfgs=cfgs, awq_report=awq_report)
        elif not want_act or stats is not None:
            mode = "stats" if (want_act and stats is not None) else "none"
            for p in paths:
                do(p, xbar_for(p, stats or {}))
        elif calibration.mode == "offline":
            mode = "offline"
            t0 = time.perf_counter()
            sums, count = collect_offline(new, np.asarray(tokens), paths,
                                          batch_size=calibration.batch_size, progress=False)
            table = finalize(sums, count, calibration.statistic)
            idle = uncalibrated_experts(sums)
            calib_s = time.perf_counter() - t0
            for p in paths:
                do(p, xbar_for(p, table))
        else:
            mode = "sequential"
            calib_s = _sequential(new, np.asarray(tokens), paths, calibration, do, xbar_for,
                                  idle)
    finally:
        bar.close()
    total = time.perf_counter() - t_start
    return new, QuantReport(reports, calib_s, total - calib_s, total, n_tok, mode, method,
                            awq_report,
                            {k: v for k, v in idle.items() if cfgs[k].uses_activation_stats})


def _sequential(model, tokens, paths, calibration, do, xbar_for, idle, *,
                hessian: bool = False, awq: AWQConfig | None = None, cfgs=None,
                awq_report=None) -> float:
    """Block by block: each group of layers (sharing an input) is calibrated on the model in
    which every earlier layer is already quantized, then quantized. Returns calibration s;
    adds the experts no token reached to `idle`. With `hessian`, each plain layer also gets
    H = 2 X^T X / n of its input (GPTQ), one block's at a time. With `awq`, each block's
    AWQ scales are searched and folded (in float) before its layers are calibrated."""
    by_block = group_by_block(paths, "sequential calibration")
    calib_s = 0.0
    t0 = time.perf_counter()
    # data parallel under jax.distributed (not for AWQ, whose search sees every batch)
    n_batches, batches = my_batches(model, tokens, calibration.batch_size, split=awq is None)
    split = len(batches) < n_batches
    xs = [b[0] for b in batches]
    extras = [b[1] for b in batches]
    count = int(tokens.size)
    calib_s += time.perf_counter() - t0
    for i, block in enumerate(model.layers):
        rel = by_block.get(i, [])
        if awq is not None and rel:
            t0 = time.perf_counter()
            c = model.config
            found = apply_awq(block, list(zip(xs, extras, strict=True)), rel,
                              {r: cfgs[f"layers.{i}.{r}"] for r in rel}, awq,
                              mha=c.num_heads == c.num_kv_heads)
            awq_report += [{"block": i, **dataclasses.asdict(g)} for g in found]
            calib_s += time.perf_counter() - t0
        groups = call_groups(block, xs[0], extras[0], rel) if rel else []
        for grp in groups:
            t0 = time.perf_counter()
            per_batch = []
            xtx: dict = {}
            for x, ex in zip(xs, extras, strict=True):
                _, s, *h = run_block(block, x, ex, grp, hessian=hessian)
                per_batch.append(s)
                for k, v in (h[0] if h else {}).items():
                    xtx[k] = xtx[k] + v if k in xtx else v
            sums = fold_batches(per_batch, n_batches)
            if split and xtx:  # each process's partial X^T X, added in process order
                xtx = distributed.sum_over_processes(xtx)
            table = {f"layers.{i}.{k}": v
                     for k, v in finalize(sums, count, calibration.statistic).items()}
            idle.update({f"layers.{i}.{k}": v for k, v in uncalibrated_experts(sums).items()})
            calib_s += time.perf_counter() - t0
            for r in grp:
                p = f"layers.{i}.{r}"
                h = xtx.get(r)
                do(p, xbar_for(p, table), None if h is None else (2.0 / count) * h)
        if i + 1 < len(model.layers) and any(j > i for j in by_block):
            t0 = time.perf_counter()
            xs = [run_block(block, x, ex)[0] for x, ex in zip(xs, extras, strict=True)]
            calib_s += time.perf_counter() - t0
    return calib_s


def model_bytes(model) -> dict[str, int]:
    """Bytes of the model's arrays by kind: quantized layers vs everything else."""
    _, state = nnx.split(model)
    out = {"quantized": 0, "other": 0}
    for _, v in nnx.to_flat_state(state):
        a = v.get_value()
        out["quantized" if isinstance(v, QuantState) else "other"] += a.size * a.dtype.itemsize
    return out
