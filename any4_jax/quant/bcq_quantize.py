"""One `[N, K]` matrix -> `BCQWeight`: array scales, normalized blocks, codebooks (given or
learned on this matrix), then every block's selector and codes (docs/bcq.md).

`quantize.quantize_weight(w, QuantConfig(format="bcq"))` checks its arguments and calls
`quantize_bcq`; call that directly only with a weight already validated.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from any4_jax.quant.bcq import BCQMeta, array_scales, check_bcq_shape, encode, normalize, qmax_of
from any4_jax.quant.bcq_fit import BCQFitConfig, assign, fit_codebooks


def check_codebooks(codebooks, *, n_codebooks: int, codebook_bits: int,
                    name: str = "codebooks") -> np.ndarray:
    """Given codebooks as a float32 [Nc, 16] array with sorted rows; a ValueError naming what
    does not fit the config (shape, non-integers, magnitude above qmax)."""
    c = np.asarray(codebooks, dtype=np.float64)
    qmax = qmax_of(codebook_bits)
    if c.shape != (n_codebooks, 16):
        raise ValueError(f"{name}: shape {c.shape}, expected ({n_codebooks}, 16) for "
                         f"n_codebooks={n_codebooks}; learn them with the same n_codebooks "
                         "(any4 bcq-calibrate --n-codebooks)")
    if not np.all(np.isfinite(c)) or np.any(c != np.round(c)) or np.abs(c).max() > qmax:
        raise ValueError(f"{name}: entries must be integers in [-{qmax}, {qmax}] "
                         f"({codebook_bits}-bit codebooks); these were learned for another "
                         "codebook_bits")
    return np.sort(c, axis=-1).astype(np.float32)


def sample_weights(xn_shape, e, xbar, *, array_len: int, weighting: str):
    """Per-scalar weights [N, K] of the codebook fit, mean 1 over the tensor: 1 ("none"),
    xbar_k ("activations"), or xbar_k * (array scale)^2 ("activations_x_scales": the error
    in the weight's own units, each array's normalized error times its squared scale)."""
    n, k = xn_shape
    w = jnp.ones((n, k), jnp.float32)
    if weighting != "none":
        w = w * jnp.asarray(xbar, jnp.float32)[None, :]
    if weighting == "activations_x_scales":
        # the tensor's power of two is common to every array: e alone sets the ratios
        s2 = jnp.repeat(jnp.square(e), array_len, axis=1)
        w = w * s2
    mean = jnp.mean(w)
    return jnp.where(mean > 0, w / jnp.where(mean > 0, mean, 1.0), jnp.ones_like(w))


def normalized_blocks(w, config, xbar=None):
    """w [N, K] -> (blocks [N*K/Lb, Lb], their weights, e [N, K/La], ts []) for `config`."""
    n, k = w.shape
    qmax = qmax_of(config.codebook_bits)
    e, ts = array_scales(w, config.array_len, qmax)
    xn = normalize(w, e, ts, config.array_len)
    sw = sample_weights((n, k), e, xbar, array_len=config.array_len,
                        weighting=config.sample_weighting if xbar is not None else "none")
    lb = config.block_len
    return xn.reshape(-1, lb), sw.reshape(-1, lb), e, ts


def quantize_bcq(w, config, *, xbar=None, codebooks=None, fit: BCQFitConfig | None = None,
                 name: str = "weight", progress: bool = False):
    """w [N, K] (validated) with a QuantConfig of format "bcq" -> (BCQWeight, info).

    xbar [K]: activation statistic for the sample weights (None: unweighted).
    codebooks [Nc, 16]: universal codebooks to encode with (None: learned on this matrix).
    info: {"mse": weighted MSE in normalized units, "fit_iters", "fit_seconds", "local"}."""
    n, k = w.shape
    check_bcq_shape(k, config.block_len, config.array_len, name=name)
    meta = BCQMeta(block_len=config.block_len, array_len=config.array_len,
                   n_codebooks=config.n_codebooks, codebook_bits=config.codebook_bits,
                   shape=(n, k), dtype=jnp.dtype(w.dtype).name)
    x, sw, e, ts = normalized_blocks(w, config, xbar)
    info: dict = {"local": codebooks is None}
    if codebooks is None:
        res = fit_codebooks(x, sw, n_codebooks=config.n_codebooks,
                            codebook_bits=config.codebook_bits, config=fit, progress=progress,
                            desc=f"{name} codebooks")
        c = jnp.asarray(res.codebooks)
        info.update(fit_iters=res.iters, fit_seconds=res.seconds, fit_mse=res.mse[-1])
    else:
        c = jnp.asarray(check_codebooks(codebooks, n_codebooks=config.n_codebooks,
                                        codebook_bits=config.codebook_bits, name=name))
    sel, idx, err = assign(x, sw, c)
    info["mse"] = float(jnp.sum(err) / jnp.sum(sw))
    qw = encode(idx.reshape(n, k), sel.reshape(n, k // config.block_len), c, e, ts, meta)
    return qw, info
