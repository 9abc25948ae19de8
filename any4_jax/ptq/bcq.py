"""Universal LO-BCQ codebooks for a whole model (`any4 bcq-calibrate`, docs/bcq.md).

The weights' codebooks are learned once on blocks drawn from every selected layer (each
layer's share in proportion to its size, every layer normalized by its own array scales, with
its activation statistics as sample weights when given); the activations' codebooks on blocks
of the layers' actual inputs over calibration tokens (each token row scaled as the activation
quantizer scales it), with the end entries pinned at -qmax and qmax (`act_quant`).
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from any4_jax.nn.layers import get_layer, num_experts, weight_rows
from any4_jax.ptq.calibrate import _run_inputs, call_groups, embed_batches, group_by_block
from any4_jax.quant.act_quant import ActQuantConfig
from any4_jax.quant.bcq import array_scales, check_bcq_shape, normalize, qmax_of
from any4_jax.quant.bcq_codebooks import BCQCodebooks
from any4_jax.quant.bcq_fit import BCQFitConfig, fit_codebooks
from any4_jax.quant.bcq_quantize import normalized_blocks
from any4_jax.quant.config import QuantConfig


def check_bcq(model, cfgs: dict[str, QuantConfig], method: str, codebooks, act_quant) -> None:
    """LO-BCQ and activation-quantizer settings against the layers, before any work."""
    bcq = [p for p, c in cfgs.items() if c.spec.family == "bcq"]
    if codebooks is not None and not isinstance(codebooks, BCQCodebooks):
        raise TypeError(f"codebooks must be a BCQCodebooks (BCQCodebooks.load(path)), got "
                        f"{type(codebooks).__name__}")
    if act_quant is not None and not isinstance(act_quant, ActQuantConfig):
        raise TypeError(f"act_quant must be an ActQuantConfig, got {type(act_quant).__name__}")
    if bcq and method != "rtn":
        raise ValueError(f"method={method!r} does not apply to format 'bcq' (its codes come "
                         "from the codebook assignment); use method='rtn'")
    stacked = [p for p in bcq if num_experts(get_layer(model, p))]
    if stacked:
        raise ValueError(f"format 'bcq' takes plain layers; {stacked[:3]} hold stacked experts "
                         "(exclude them or give them another format with an override)")
    if codebooks is not None:
        for p in bcq:
            diff = codebooks.matches(cfgs[p])
            if diff:
                raise ValueError(f"{p}: the codebooks were learned for other settings ("
                                 f"{'; '.join(diff)}); learn them with these or change the "
                                 "config")
    for p, c in cfgs.items():
        k = get_layer(model, p).kernel.shape[-2]
        if c.spec.family == "bcq":
            check_bcq_shape(k, c.block_len, c.array_len, name=p)
        if act_quant is not None and k % act_quant.unit:
            raise ValueError(f"{p}: in_features K={k} is not a multiple of the activation "
                             f"quantizer's {act_quant.kind} length {act_quant.unit}")


def _shares(sizes: list[int], total: int) -> list[int]:
    """Blocks to draw from each layer: proportional to its size, at least 1, at most all."""
    whole = sum(sizes)
    return [min(s, max(1, round(total * s / whole))) for s in sizes]


def _draw(x, w, n: int, rng: np.random.Generator):
    """At most n rows of x (and of w, unless None), drawn without replacement."""
    x, w = np.asarray(x), None if w is None else np.asarray(w)
    if n < x.shape[0]:
        pick = np.sort(rng.choice(x.shape[0], size=n, replace=False))
        x, w = x[pick], None if w is None else w[pick]
    return x, w


def weight_blocks(model, paths: list[str], config: QuantConfig, *, stats=None,
                  max_blocks: int, seed: int = 0, progress: bool = False):
    """Normalized blocks [B, Lb] and weights drawn from the layers' weights."""
    sizes = [int(np.prod(get_layer(model, p).kernel.shape)) // config.block_len for p in paths]
    rng = np.random.default_rng(seed)
    xs, ws = [], []
    for p, n in tqdm(list(zip(paths, _shares(sizes, max_blocks), strict=True)),
                     desc="weight blocks", unit="layer", leave=False, disable=not progress):
        xbar = None if stats is None or not config.uses_activation_stats else stats.get(p)
        x, w, _, _ = normalized_blocks(weight_rows(get_layer(model, p)), config, xbar)
        x, w = _draw(x, w, n, rng)
        xs.append(x)
        ws.append(w)
    return np.concatenate(xs), np.concatenate(ws)


def activation_blocks(model, tokens: np.ndarray, paths: list[str], config: QuantConfig, *,
                      max_blocks: int, seed: int = 0, batch_size: int = 8,
                      progress: bool = False):
    """Normalized blocks [B, Lb] of the layers' inputs over `tokens` [n, t] (inputs shared by
    several layers counted once), each token row scaled as `act_quant.fake_quantize` does."""
    by_block = group_by_block(paths, "activation codebooks")
    batches = embed_batches(model, tokens, batch_size)
    xs = [b[0] for b in batches]
    qmax, la, lb = qmax_of(config.codebook_bits), config.array_len, config.block_len
    per_input = max(1, max_blocks // max(1, sum(len(v) for v in by_block.values())))
    rng = np.random.default_rng(seed)
    out = []
    last = max(by_block, default=-1)
    for i, block in enumerate(tqdm(model.layers, desc="activation blocks", unit="block",
                                   leave=False, disable=not progress)):
        graphdef, state = nnx.split(block)
        rel = by_block.get(i, [])
        # one tap per distinct input (q, k and v share theirs)
        taps = tuple(g[0] for g in call_groups(block, xs[0], batches[0][1], rel)) if rel else ()
        got: dict = {}
        for j, (_, extras) in enumerate(batches):
            y, inputs = _run_inputs(graphdef, state, xs[j], extras, taps)
            xs[j] = y
            for k, v in inputs.items():
                got.setdefault(k, []).append(v)
        for k, parts in got.items():
            a = jnp.concatenate([jnp.reshape(v, (-1, v.shape[-1])) for v in parts])
            check_bcq_shape(a.shape[-1], lb, la, name=f"layers.{i}.{k} input")
            e, ts = array_scales(a, la, qmax, per_row=True)
            blocks = normalize(a, e, ts, la).reshape(-1, lb)
            out.append(_draw(blocks, None, per_input, rng)[0])
        if i >= last:
            break
    return np.concatenate(out)


def learn_codebooks(model, config: QuantConfig, paths: list[str], *, stats=None,
                    tokens: np.ndarray | None = None, activations: bool = False,
                    progress: bool = True, source: str = "") -> BCQCodebooks:
    """Universal codebooks for `config` (format "bcq") from the layers at `paths`: weights
    always, activations too with `activations` (needs `tokens` [n, t]). config.bcq_fit says
    how many blocks to learn on (max_blocks, drawn with its seed) and when to stop."""
    if config.spec.family != "bcq":
        raise ValueError(f"learn_codebooks: config.format is {config.format!r}; pass "
                         "QuantConfig(format='bcq', ...)")
    if activations and tokens is None:
        raise ValueError("activation codebooks need calibration tokens (tokens=[n, t])")
    fit: BCQFitConfig = config.bcq_fit
    for p in paths:
        check_bcq_shape(get_layer(model, p).kernel.shape[-2], config.block_len,
                        config.array_len, name=p)
    info: dict = {"source": source, "layers": len(paths), "fit": fit.__dict__.copy(),
                  "sample_weighting": config.sample_weighting if stats is not None else "none"}
    t0 = time.perf_counter()
    x, w = weight_blocks(model, paths, config, stats=stats, max_blocks=fit.max_blocks,
                         seed=fit.seed, progress=progress)
    res = fit_codebooks(x, w, n_codebooks=config.n_codebooks,
                        codebook_bits=config.codebook_bits, config=fit, progress=progress,
                        desc="weight codebooks")
    info["weights"] = {"blocks": res.blocks, "iters": res.iters, "mse_float": res.mse_float,
                       "mse": res.mse,
                       "seconds": time.perf_counter() - t0}
    acts = None
    if activations:
        t0 = time.perf_counter()
        xa = activation_blocks(model, np.asarray(tokens), paths, config,
                               max_blocks=fit.max_blocks, seed=fit.seed, progress=progress)
        ra = fit_codebooks(xa, None, n_codebooks=config.n_codebooks,
                           codebook_bits=config.codebook_bits, config=fit, pin_range=True,
                           progress=progress, desc="activation codebooks")
        acts = ra.codebooks
        info["activations"] = {"blocks": ra.blocks, "iters": ra.iters,
                               "mse_float": ra.mse_float, "mse": ra.mse,
                               "tokens": int(np.asarray(tokens).size),
                               "seconds": time.perf_counter() - t0}
    return BCQCodebooks(weights=res.codebooks, block_len=config.block_len,
                        array_len=config.array_len, codebook_bits=config.codebook_bits,
                        activations=acts, info=info)
