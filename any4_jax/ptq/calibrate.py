"""Calibration: per-input-channel statistics of every Dense-like layer's input.

Generic over NNX models that follow a small protocol: `model.layers` (the blocks, each called
as `block(x, *extras)` returning `x` or `(x, ...)`) and `model.embed_inputs(tokens) ->
(x, extras)`. A layer's input is captured by wrapping the layer in a tap on a *copy* of the
block inside a jitted function: the model code is not touched and nothing is patched
globally. Sums of x and |x| (float32) are accumulated over every calibration token, so both
statistics of docs/design.md come from one pass:
  abs_of_mean = |mean_t x_tj|   (the reference release's default)
  mean_of_abs = mean_t |x_tj|   (the paper's wording)

Stacked experts (a layer called as `layer(x, routing)` with `routing.tile_expert` and
`routing.row_valid`, `models.llama.moe`) get one statistic per expert, from the rows the
forward routed to that expert and no others (each routed token once, as the expert sees it;
the routing weight applies after the expert, so it does not enter its input). An expert that
no calibration token reached gets no statistic: its rows fall back to uncalibrated (uniform)
sample weights, and `uncalibrated_experts` lists them.

Under `jax.distributed` the calibration batches are shared out over the processes (data
parallel, `my_batches`) and every batch's sums are gathered and added in batch order
(`fold_batches`), so every process gets the one-process statistics bit for bit.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from any4_jax import distributed
from any4_jax.nn.layers import get_layer, num_experts, set_layer

STATISTICS = ("abs_of_mean", "mean_of_abs")
MODES = ("sequential", "offline")

# Written for this project: a few sentences of fiction, news, code, arithmetic and facts.
DEFAULT_PROMPT = (
    "Fiction: The lighthouse keeper's daughter rowed out before dawn, certain that the strange "
    "lantern she had seen on the rocks belonged to no ship she knew.\n"
    "News: On Tuesday the city council approved a new budget that raises funding for public "
    "transport and delays the renovation of the central library.\n"
    "Code:\ndef mean(xs):\n    return sum(xs) / len(xs)\nprint(mean([3, 5, 8]))\n"
    "Math: (12.5 - 4.25) * 3 + 7 / 2 = 28.25\n"
    "Facts: Water boils at 100 degrees Celsius at sea level. The Pacific is the largest ocean "
    "on Earth. Tokyo is the capital of Japan.\n"
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """How activation statistics are gathered.

    source: "prompt" (DEFAULT_PROMPT, one sequence) or "text" (random windows of a text the
      caller tokenizes: `num_samples` windows of `seq_len` tokens, seeded).
    statistic: "abs_of_mean" or "mean_of_abs".
    mode: "sequential" (block by block through the already-quantized model) or "offline"
      (one forward of the unquantized model).
    batch_size: calibration sequences per block forward (memory bound).
    """

    source: str = "prompt"
    num_samples: int = 128
    seq_len: int = 512
    statistic: str = "abs_of_mean"
    mode: str = "sequential"
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self):
        if self.statistic not in STATISTICS:
            raise ValueError(f"CalibrationConfig: unknown statistic={self.statistic!r}; choose "
                             f"one of {STATISTICS}")
        if self.mode not in MODES:
            raise ValueError(f"CalibrationConfig: unknown mode={self.mode!r}; choose one of "
                             f"{MODES}")
        for f in ("num_samples", "seq_len", "batch_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"CalibrationConfig.{f}={getattr(self, f)} must be positive")


def calibration_tokens(encode, config: CalibrationConfig, text: str | None = None) -> np.ndarray:
    """[n, t] int32 calibration sequences: the prompt, or seeded random windows of `text`."""
    if config.source == "prompt" or text is None:
        return np.asarray([encode(DEFAULT_PROMPT)], np.int32)
    ids = np.asarray(encode(text), np.int32)
    if len(ids) <= config.seq_len:
        raise ValueError(f"the calibration text has {len(ids)} tokens, not more than "
                         f"seq_len={config.seq_len}; use a longer text or a smaller seq_len")
    rng = np.random.default_rng(config.seed)
    starts = rng.integers(0, len(ids) - config.seq_len, size=config.num_samples)
    return np.stack([ids[s:s + config.seq_len] for s in starts])


def finalize(sums: dict[str, tuple], count: int, statistic: str) -> dict[str, np.ndarray]:
    """{layer: (sum x, sum |x|)} over `count` tokens -> {layer: xbar [K] float32}; stacked
    experts' (sums [E, K], sums [E, K], tokens [E]) -> xbar [E, K], ones for an expert that
    saw no token (uncalibrated: uniform sample weights)."""
    i = 0 if statistic == "abs_of_mean" else 1
    out = {}
    for k, v in sums.items():
        if len(v) == 3:  # per expert, over the tokens routed to each
            n = np.asarray(v[2], np.float64)[:, None]
            m = np.asarray(v[i], np.float64) / np.maximum(n, 1)
            out[k] = np.where(n > 0, np.abs(m), 1.0).astype(np.float32)
        else:
            m = np.asarray(v[i], np.float64) / count
            out[k] = np.abs(m).astype(np.float32)
    return out


def uncalibrated_experts(sums: dict[str, tuple]) -> dict[str, list[int]]:
    """{layer: experts that no calibration token reached}, for the stacked-expert layers."""
    out = {}
    for k, v in sums.items():
        if len(v) == 3:
            idle = [int(e) for e in np.flatnonzero(np.asarray(v[2]) == 0)]
            if idle:
                out[k] = idle
    return out


# --- taps ----------------------------------------------------------------------------------

class _Tap:
    """Calls the wrapped layer and records its input: (key, x, expert of each row of x or
    None, number of experts)."""

    def __init__(self, layer, key, sink):
        self.layer, self.key, self.sink = layer, key, sink

    def __call__(self, x, *args, **kw):
        routing = args[0] if args and hasattr(args[0], "tile_expert") else None
        if routing is None:
            self.sink.append((self.key, x, None, 0))
        else:  # stacked experts: x [tiles, B, K], the expert of each row, -1 for padding
            e = jnp.where(routing.row_valid, routing.tile_expert[:, None], -1).reshape(-1)
            self.sink.append((self.key, x, e, num_experts(self.layer)))
        return self.layer(x, *args, **kw)


def _tapped(block, taps, sink):
    for p in taps:
        set_layer(block, p, _Tap(get_layer(block, p), p, sink))


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def add_sums(acc: dict, key: str, s) -> None:
    """Accumulates a (sum x, sum |x|) pair (or an experts' triple) into acc[key]."""
    acc[key] = s if key not in acc else tuple(a + b for a, b in zip(acc[key], s, strict=True))


def _tapped_forward(graphdef, state, x, extras, taps):
    """One forward of a copy of the block with `taps` recording their inputs:
    (output, [(tap, input [rows, K], expert of each row or None, experts)])."""
    block = nnx.merge(graphdef, state)
    sink: list = []
    _tapped(block, taps, sink)
    y = _out(block(x, *extras))
    flat: dict = {}  # one reshaped array per distinct input: taps that share it share it
    for _, v, _, _ in sink:
        flat.setdefault(id(v), v.reshape(-1, v.shape[-1]))
    return y, [(k, flat[id(v)], e, n) for k, v, e, n in sink]


def _input_sums(xin, experts, n: int):
    """(sum x, sum |x|) over the rows; per expert (and tokens per expert) for stacked ones."""
    x32 = xin.astype(jnp.float32)
    if experts is None:
        return x32.sum(0), jnp.abs(x32).sum(0)
    seg = jnp.where(experts < 0, n, experts)  # padding rows into a dropped segment
    per = lambda a: jax.ops.segment_sum(a, seg, num_segments=n + 1)[:n]
    return per(x32), per(jnp.abs(x32)), per(jnp.ones_like(seg, jnp.float32))


@partial(jax.jit, static_argnums=(0, 4, 5))
def _run(graphdef, state, x, extras, taps: tuple[str, ...], hessian: bool = False):
    """One block forward; returns (output, {tap: (sum x, sum |x|) or experts' triple}) and,
    with `hessian`, {tap: X^T X [K, K] float32} for the plain (not stacked) taps, computed
    once per distinct input (q, k and v share theirs)."""
    y, sink = _tapped_forward(graphdef, state, x, extras, taps)
    sums: dict = {}
    xtx: dict = {}
    seen: dict = {}
    for key, xin, experts, n in sink:
        add_sums(sums, key, _input_sums(xin, experts, n))
        if hessian and experts is None:
            if id(xin) not in seen:
                x32 = xin.astype(jnp.float32)
                seen[id(xin)] = jnp.matmul(x32.T, x32, precision=jax.lax.Precision.HIGHEST)
            xtx[key] = seen[id(xin)]
    return (y, sums, xtx) if hessian else (y, sums)


def run_block(block, x, extras, taps=(), *, hessian: bool = False):
    """One forward of `block`: (output, input sums per tap) and, with `hessian`, the taps'
    X^T X (see `_run`)."""
    graphdef, state = nnx.split(block)
    return _run(graphdef, state, x, extras, tuple(taps), hessian)


def call_groups(block, x, extras, paths) -> list[list[str]]:
    """`paths` in the order the block calls them, grouped by shared input (q/k/v, gate/up):
    the layers of one group can be quantized together, as none feeds another."""
    order: list = []
    graphdef, state = nnx.split(block)

    def f(state, x):
        b = nnx.merge(graphdef, state)
        _tapped(b, paths, order)
        b(x, *extras)

    jax.eval_shape(f, state, x)
    groups: list[list[str]] = []
    prev = None
    for key, xin, _, _ in order:
        if groups and xin is prev:
            groups[-1].append(key)
        else:
            groups.append([key])
        prev = xin
    seen = {k for g in groups for k in g}
    missing = [p for p in paths if p not in seen]
    if missing:
        raise ValueError(f"layers {missing} are never called by the block's forward; they "
                         "cannot be calibrated (exclude them)")
    return groups


@partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, tokens):
    return nnx.merge(graphdef, state).embed_inputs(tokens)


def embed_batches(model, tokens: np.ndarray, batch_size: int):
    """[(x, extras)] per batch of calibration sequences."""
    graphdef, state = nnx.split(model)
    return [_embed(graphdef, state, jnp.asarray(tokens[i:i + batch_size]))
            for i in range(0, len(tokens), batch_size)]


def group_by_block(paths: list[str], what: str) -> dict[int, list[str]]:
    """'layers.3.mlp.up_proj' -> {3: ['mlp.up_proj']}; a layer outside the decoder blocks is an
    error naming `what` (calibration only runs through the blocks)."""
    by_block: dict[int, list[str]] = {}
    rest = []
    for p in paths:
        parts = p.split(".", 2)
        if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
            by_block.setdefault(int(parts[1]), []).append(parts[2])
        else:
            rest.append(p)
    if rest:
        raise ValueError(f"{what} covers the decoder blocks only; {rest} lie outside them "
                         "(exclude them, or quantize them without activations)")
    return by_block


def collect_offline(model, tokens: np.ndarray, paths: list[str], *, batch_size: int = 16,
                    progress: bool = False) -> tuple[dict, int]:
    """One forward of `model` (unchanged): ({path: (sum x, sum |x|)}, token count)."""
    by_block = group_by_block(paths, "offline calibration")
    n_batches, batches = my_batches(model, tokens, batch_size)
    xs = [b[0] for b in batches]
    sums: dict = {}
    for i, block in enumerate(tqdm(model.layers, desc="calibrating", disable=not progress,
                                   leave=False)):
        taps = by_block.get(i, [])
        per_batch = []
        for j, (x, extras) in enumerate(zip(xs, [b[1] for b in batches], strict=True)):
            y, s = run_block(block, x, extras, taps)
            xs[j] = y
            per_batch.append(s)
        for k, v in fold_batches(per_batch, n_batches).items():
            sums[f"layers.{i}.{k}"] = v
    return sums, int(tokens.size)


def my_batches(model, tokens: np.ndarray, batch_size: int,
               split: bool = True) -> tuple[int, list]:
    """(number of batches, [(x, extras)] of this process's batches). Under jax.distributed
    each process takes a contiguous share of the batches of `tokens` (`distributed.share`):
    batch j holds the same sequences in any number of processes."""
    n = -(-len(tokens) // batch_size)
    mine = distributed.share(n) if split else range(n)
    return n, embed_batches(model, tokens[mine.start * batch_size:mine.stop * batch_size],
                            batch_size)


def fold_batches(per_batch: list[dict], n_batches: int) -> dict:
    """Every batch's sums ({tap: (sum x, sum |x|)} or an experts' triple, this process's
    share in `per_batch`) added in batch order: the one-process sums bit for bit, in every
    process (a collective when the batches are split over processes)."""
    sums: dict = {}
    if not per_batch or not per_batch[0]:  # no taps in this block: nothing to reduce
        return sums
    for s in distributed.gather_items(per_batch, n_batches):
        for k, v in s.items():
            add_sums(sums, k, v)
    return sums


@partial(jax.jit, static_argnums=(0, 4))
def _run_inputs(graphdef, state, x, extras, taps: tuple[str, ...]):
    y, sink = _tapped_forward(graphdef, state, x, extras, taps)
    return y, {k: v for k, v, _, _ in sink}


def collect_inputs(model, tokens: np.ndarray, paths: list[str], *,
                   batch_size: int = 16) -> dict[str, np.ndarray]:
    """The actual inputs [tokens, K] (float32) of the decoder-block layers in `paths`, from
    one forward of `model`: for error analysis on calibration activations."""
    by_block = group_by_block(paths, "error analysis")
    stacked = [p for p in paths if num_experts(get_layer(model, p))]
    if stacked:
        raise ValueError(f"error analysis takes plain layers; {stacked[:3]} hold stacked "
                         "experts, whose rows see different tokens (exclude "
                         "'*.experts.*' from the analysis)")
    out: dict[str, list] = {}
    batches = embed_batches(model, tokens, batch_size)
    xs = [b[0] for b in batches]
    for i, block in enumerate(model.layers):
        graphdef, state = nnx.split(block)
        for j, (_, extras) in enumerate(batches):
            y, got = _run_inputs(graphdef, state, xs[j], extras, tuple(by_block.get(i, [])))
            xs[j] = y
            for k, v in got.items():
                out.setdefault(f"layers.{i}.{k}", []).append(np.asarray(v, np.float32))
        if i >= max(by_block, default=-1):
            break
    return {k: np.concatenate(v) for k, v in out.items()}
