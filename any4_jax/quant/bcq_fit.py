"""The LO-BCQ iteration: codebooks that lower the (weighted) MSE of block-clustered codes.

On normalized blocks X [B, Lb] (values in about [-qmax, qmax], see `bcq.normalize`) with
sample weights W [B, Lb] >= 0 and codebooks C [Nc, 16] (sorted, integer-valued), one step is:

  1. assignment: every scalar to its nearest entry of each codebook (ties to the lower entry),
     every block to the codebook with the least weighted squared error (ties to the lower
     index);
  2. update: with the blocks' codebooks and the scalars' cells fixed, every entry becomes the
     integer nearest the weighted mean of its cell, clipped to [-qmax, qmax] (the best integer
     for a quadratic; an empty cell keeps its entry); codebooks are re-sorted.

Neither step raises the weighted MSE, so the sequence MSE(C_t) falls monotonically; the loop
stops when a step lowers it by less than `tol` (relative) or after `max_iter` steps.
Initialisation: blocks sorted by their largest |value|, cut into Nc equal-count groups; each
group's codebook is 16 quantiles (at (j + 1/2) / 16) of its scalars, rounded, and spread to 16
distinct integers (qmax >= 8).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from any4_jax.quant.bcq import qmax_of

# Blocks per compiled call of the assignment (a [chunk, Lb, Nc, 15] comparison is fused, but
# bounded chunks keep the working set near 100 MB on a CPU).
CHUNK_BLOCKS = 1 << 15


@dataclasses.dataclass(frozen=True, kw_only=True)
class BCQFitConfig:
    """How codebooks are learned.

    max_iter: LO-BCQ steps at most, in each of the two phases (real-valued entries, then
      integer ones; 0 keeps the initial codebooks).
    tol: stop once a step lowers the weighted MSE by less than tol * MSE.
    max_blocks: learn on at most this many blocks, drawn without replacement with `seed`
      (all of them when there are fewer); every block is still encoded.
    seed: the draw of the blocks (the iteration itself has no randomness).
    """

    max_iter: int = 50
    tol: float = 1e-4
    max_blocks: int = 1 << 15
    seed: int = 0

    def __post_init__(self):
        for name, low in (("max_iter", 0), ("max_blocks", 1), ("seed", None)):
            v = getattr(self, name)
            if not isinstance(v, int | np.integer) or isinstance(v, bool) or (
                    low is not None and v < low):
                rule = "" if low is None else f" >= {low}"
                raise ValueError(f"BCQFitConfig: {name}={v!r} must be an integer{rule}")
        if not isinstance(self.tol, int | float) or isinstance(self.tol, bool) or not self.tol >= 0:
            raise ValueError(f"BCQFitConfig: tol={self.tol!r} must be a number >= 0")


def _nearest_all(x, c):
    """x [B, Lb], c [Nc, 16] sorted -> the nearest entry of every codebook [Nc, B, Lb]: the
    number of midpoints below x (ties to the lower entry), then that entry. Codebook-major,
    as one searchsorted per codebook: XLA:CPU vectorizes this far better than a reduction
    over a minor axis of 15 comparisons ([B, Lb, Nc, 15])."""
    mid = (c[:, 1:] + c[:, :-1]) * 0.5  # [Nc, 15]
    idx = jax.vmap(lambda m: jnp.searchsorted(m, x, side="left", method="compare_all"))(mid)
    nc = c.shape[0]
    return jnp.take_along_axis(c[:, None, :], idx.reshape(nc, 1, -1), axis=-1).reshape(idx.shape)


def nearest_index(x, c):
    """x [..., Lb], c [..., 16] sorted (one codebook per block) -> entry indices [..., Lb]."""
    mid = (c[..., 1:] + c[..., :-1]) * 0.5  # [..., 15]
    return jnp.sum(x[..., :, None] > mid[..., None, :], axis=-1).astype(jnp.int32)


@jax.jit
def block_errors(x, w, c):
    """x, w [B, Lb], c [Nc, 16] -> weighted squared error of every block under every codebook
    [B, Nc]."""
    d = x[None] - _nearest_all(x, c)  # [Nc, B, Lb]
    return jnp.sum(w[None] * d * d, axis=2).T


@jax.jit
def _assign_chunk(x, w, c):
    """-> (selectors [B], entry indices [B, Lb], the chosen error [B])."""
    err = block_errors(x, w, c)  # [B, Nc]
    sel = jnp.argmin(err, axis=-1).astype(jnp.int32)
    idx = nearest_index(x, c[sel])
    return sel, idx, jnp.take_along_axis(err, sel[:, None], axis=-1)[:, 0]


def assign(x, w, c, *, chunk: int = CHUNK_BLOCKS):
    """Step 1 over all blocks, in chunks: x, w [B, Lb], c [Nc, 16] -> (selectors [B] int32,
    entry indices [B, Lb] int32, per-block weighted error [B])."""
    b = x.shape[0]
    if b <= chunk:
        return _assign_chunk(x, w, c)
    outs = []
    for s in range(0, b, chunk):
        xs, ws = x[s:s + chunk], w[s:s + chunk]
        pad = chunk - xs.shape[0]
        if pad:  # one shape: one compilation
            xs, ws = jnp.pad(xs, ((0, pad), (0, 0))), jnp.pad(ws, ((0, pad), (0, 0)))
        outs.append([a[:chunk - pad] for a in _assign_chunk(xs, ws, c)])
    return tuple(jnp.concatenate([o[i] for o in outs]) for i in range(3))


def pin(c, qmax: int):
    """Entries 0 and 15 of every (sorted) codebook set to -qmax and qmax."""
    return c.at[:, 0].set(-qmax).at[:, -1].set(qmax)


@functools.partial(jax.jit, static_argnames=("qmax", "pin_range", "integer"))
def update(x, w, c, sel, idx, *, qmax: int, pin_range: bool = False, integer: bool = True):
    """Step 2: c [Nc, 16] -> each entry the integer nearest the weighted mean of its cell
    (blocks by `sel` [B], scalars by `idx` [B, Lb]), clipped; empty cells keep their entry;
    rows sorted; with pin_range the end entries stay at -qmax and qmax. integer=False: the
    weighted means themselves (the float phase of `fit_codebooks`)."""
    nc = c.shape[0]
    key = (sel[:, None] * 16 + idx).reshape(-1)
    ws = jnp.zeros(nc * 16, jnp.float32).at[key].add(w.reshape(-1))
    wx = jnp.zeros(nc * 16, jnp.float32).at[key].add((w * x).reshape(-1))
    mean = wx / jnp.where(ws > 0, ws, 1.0)
    mean = jnp.round(mean) if integer else mean
    new = jnp.where(ws > 0, jnp.clip(mean, -qmax, qmax), c.reshape(-1))
    new = jnp.sort(new.reshape(nc, 16), axis=-1)
    return pin(new, qmax) if pin_range else new


@functools.partial(jax.jit, static_argnames=("n_codebooks", "qmax"))
def init_codebooks(x, *, n_codebooks: int, qmax: int):
    """Nc codebooks from blocks x [B, Lb] (B >= Nc): blocks sorted by max |value|, cut into Nc
    equal groups (the last B mod Nc blocks of the order left out), 16 quantiles of each."""
    b, lb = x.shape
    per = b // n_codebooks
    order = jnp.argsort(jnp.max(jnp.abs(x), axis=-1), stable=True)
    groups = x[order[: per * n_codebooks]].reshape(n_codebooks, per * lb)  # [Nc, per * Lb]
    q = (jnp.arange(16, dtype=jnp.float32) + 0.5) / 16
    c = jnp.quantile(groups, q, axis=-1).T  # [Nc, 16]
    c = jnp.sort(jnp.clip(jnp.round(c), -qmax, qmax), axis=-1)
    # distinct entries (a repeated one would start empty): each at least its left neighbour
    # + 1, then at most qmax - (entries to its right)
    j = jnp.arange(16, dtype=c.dtype)
    c = jax.lax.cummax(c - j, axis=1) + j
    return jnp.minimum(c, qmax - (15 - j))


@dataclasses.dataclass
class FitResult:
    codebooks: np.ndarray  # [Nc, 16] float32, integer-valued, rows sorted
    mse_float: list[float]  # weighted MSE (normalized units) of the float phase, first = init
    mse: list[float]  # of the integer phase, first = the rounded float codebooks
    iters: int  # steps of both phases
    blocks: int  # blocks learned on
    seconds: float


def subsample(x, w, max_blocks: int, seed: int):
    """At most max_blocks blocks of x, w [B, Lb], drawn without replacement (order kept)."""
    b = x.shape[0]
    if b <= max_blocks:
        return x, w
    pick = np.sort(np.random.default_rng(seed).choice(b, size=max_blocks, replace=False))
    return x[pick], w[pick]


def _descend(x, w, c, *, config, qmax, pin_range, integer, bar):
    """LO-BCQ steps from c until a step gains less than config.tol (relative) or max_iter:
    (codebooks, MSE history with the start first, steps taken)."""
    total_w = float(jnp.sum(w)) or 1.0
    sel, idx, err = assign(x, w, c)
    history = [float(jnp.sum(err)) / total_w]
    for _ in range(config.max_iter):
        new = update(x, w, c, sel, idx, qmax=qmax, pin_range=pin_range, integer=integer)
        sel, idx, err = assign(x, w, new)
        history.append(float(jnp.sum(err)) / total_w)
        c = new
        bar.update(1)
        bar.set_postfix_str(f"{'int' if integer else 'float'} mse {history[-1]:.4g}",
                            refresh=False)
        if history[-2] - history[-1] <= config.tol * history[-2]:
            break
    return c, history, len(history) - 1


def fit_codebooks(x, w=None, *, n_codebooks: int = 16, codebook_bits: int = 6,
                  config: BCQFitConfig | None = None, init=None, pin_range: bool = False,
                  progress: bool = False, desc: str = "LO-BCQ") -> FitResult:
    """Learns Nc integer codebooks on normalized blocks x [B, Lb] with weights w [B, Lb]
    (None: 1), in two phases: LO-BCQ steps with real-valued entries (integer-rounded steps
    alone stall within a few steps: a mean that moves by less than 1/2 never moves its
    entry), then the entries rounded and integer steps to convergence. Each phase lowers the
    MSE monotonically; the rounding between them may raise it.

    init: starting codebooks [Nc, 16] (default `init_codebooks`). pin_range: keep entries 0
    and 15 at -qmax and qmax (activation codebooks: see `act_quant`). The blocks are
    subsampled to config.max_blocks first."""
    config = config or BCQFitConfig()
    qmax = qmax_of(codebook_bits)
    x = jnp.asarray(x, jnp.float32)
    w = jnp.ones_like(x) if w is None else jnp.asarray(w, jnp.float32)
    if x.ndim != 2 or w.shape != x.shape:
        raise ValueError(f"fit_codebooks: x and w must be [blocks, block_len] of one shape, got "
                         f"{tuple(x.shape)} and {tuple(w.shape)}")
    x, w = subsample(x, w, config.max_blocks, config.seed)
    if x.shape[0] < n_codebooks:
        raise ValueError(f"fit_codebooks: {x.shape[0]} blocks cannot seed {n_codebooks} "
                         "codebooks; give more data or fewer codebooks")
    t0 = time.perf_counter()
    c = init_codebooks(x, n_codebooks=n_codebooks, qmax=qmax) if init is None else \
        jnp.sort(jnp.asarray(init, jnp.float32), axis=-1)
    if pin_range:
        c = pin(c, qmax)
    kw = dict(config=config, qmax=qmax, pin_range=pin_range)
    with tqdm(total=2 * config.max_iter, desc=desc, unit="step", leave=False,
              disable=not progress) as bar:
        c, h_float, n_float = _descend(x, w, c, integer=False, bar=bar, **kw)
        c = jnp.sort(jnp.clip(jnp.round(c), -qmax, qmax), axis=-1)
        c, h_int, n_int = _descend(x, w, c, integer=True, bar=bar, **kw)
    return FitResult(np.asarray(c), h_float, h_int, n_float + n_int, int(x.shape[0]),
                     time.perf_counter() - t0)
