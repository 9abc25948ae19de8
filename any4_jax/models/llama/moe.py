"""Sparse mixture of experts (Mixtral): a router and stacked SwiGLU experts, grouped by expert.

Each token goes to the `k` experts of highest router probability, weighted by those
probabilities renormalised over the `k` (transformers' Mixtral: softmax over all experts in
float32, top-k, divide by their sum). No expert runs on a token not routed to it and no token
is dropped: the T*k (token, expert) assignments are sorted by expert and laid out in tiles of
`B` rows, each expert's rows padded to a whole number of tiles, so every tile belongs to one
expert. An expert projection then runs tile by tile (`lax.map`), reading only the weights of
the tile's expert, and skips the tiles past the last used one. Shapes are static: at most
T*k + E*(B-1) rows, rounded up to tiles. Decode (T*k small) uses B = 1: one row per tile, no
padding, so a step reads the selected experts' weights and no others.

Stacked projections hold `kernel [E, in, out]` (`ExpertDense`); a quantizer swaps that class
as it swaps `Dense` (`nn.QuantExpertDense`). Both are called as `layer(x, routing)` with
x [tiles, B, in] and a `Routing`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from any4_jax.models.llama.config import LlamaConfig
from any4_jax.models.llama.modules import Dense, _normal

# Rows per tile of the grouped path: small enough that an expert's padding (< B rows) costs
# little, large enough that a tile is a real matrix product.
TILE_ROWS = 64
# Up to this many assignments (T * k) a step runs one row per tile: a decode step.
DECODE_ASSIGNMENTS = 16


class Routing(NamedTuple):
    """Where each row of the tiled layout comes from.

    tile_expert: [tiles] int32, the expert of each tile (-1: an unused tile, skipped).
    row_valid: [tiles, B] bool, False for the padding rows of an expert's last tile.
    """

    tile_expert: jax.Array
    row_valid: jax.Array


def map_tiles(fn, x, routing: Routing, out_features: int, dtype):
    """fn(expert, x_tile [B, in]) -> [B, out] for every used tile; zeros for unused ones.

    x: [tiles, B, in] -> [tiles, B, out]."""
    b = x.shape[1]

    def one(args):
        e, xt = args
        return lax.cond(e >= 0, lambda: fn(jnp.maximum(e, 0), xt).astype(dtype),
                        lambda: jnp.zeros((b, out_features), dtype))

    return lax.map(one, (routing.tile_expert, x))


class ExpertDense(nnx.Module):
    """E stacked projections y = x @ kernel[e]: kernel [E, in_features, out_features]."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, *, dtype,
                 rngs: nnx.Rngs):
        self.num_experts = num_experts
        self.in_features, self.out_features = in_features, out_features
        self.kernel = nnx.Param(_normal(rngs, (num_experts, in_features, out_features), dtype))

    def __call__(self, x, routing: Routing):
        """x: [tiles, B, in] -> [tiles, B, out], tile t through expert routing.tile_expert[t]."""
        k = self.kernel[...]

        def expert(e, xt):
            return jnp.einsum("bk,kn->bn", xt.astype(k.dtype), k[e],
                              preferred_element_type=jnp.float32)

        return map_tiles(expert, x, routing, self.out_features, k.dtype)

    def dense_all(self, x):
        """x: [..., in] -> [E, ..., out]: every expert on every row (the all-experts path)."""
        k = self.kernel[...]
        y = jnp.einsum("...k,ekn->e...n", x.astype(k.dtype), k,
                       preferred_element_type=jnp.float32)
        return y.astype(k.dtype)


class Experts(nnx.Module):
    """Mixtral's experts: w2(silu(w1 x) * w3 x), each projection stacked over experts."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        e, d, f = config.num_experts, config.hidden_size, config.intermediate_size
        self.w1 = ExpertDense(e, d, f, dtype=dtype, rngs=rngs)
        self.w3 = ExpertDense(e, d, f, dtype=dtype, rngs=rngs)
        self.w2 = ExpertDense(e, f, d, dtype=dtype, rngs=rngs)

    def __call__(self, x, routing: Routing):
        """x: [tiles, B, d] -> [tiles, B, d]."""
        return self.w2(jax.nn.silu(self.w1(x, routing)) * self.w3(x, routing), routing)


def route(logits, k: int):
    """logits: [T, E] -> (weights [T, k] float32, experts [T, k] int32), transformers' rule."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, idx = lax.top_k(probs, k)
    return top / top.sum(-1, keepdims=True), idx.astype(jnp.int32)


def tile_layout(experts, num_experts: int, b: int):
    """Assignments [A] (expert of each) -> where each goes in the tiled layout.

    Returns (dest [A] row in the [tiles * B] layout, Routing). Rows of one expert are
    contiguous and in assignment order; each expert starts on a tile boundary."""
    a = experts.shape[0]
    tiles = -(-(a + num_experts * (b - 1)) // b)
    counts = jnp.bincount(experts, length=num_experts)
    padded = (counts + b - 1) // b * b
    start = jnp.concatenate([jnp.zeros((1,), padded.dtype), jnp.cumsum(padded)[:-1]])
    order = jnp.argsort(experts, stable=True)
    sorted_e = experts[order]
    first = jnp.concatenate([jnp.zeros((1,), counts.dtype), jnp.cumsum(counts)[:-1]])
    rank = jnp.arange(a) - first[sorted_e]  # position within the expert's rows
    dest = jnp.zeros((a,), jnp.int32).at[order].set((start[sorted_e] + rank).astype(jnp.int32))
    tile_start = jnp.arange(tiles) * b
    end = start + padded
    # the expert whose padded range holds the tile, -1 past the last used row
    owner = jnp.sum(tile_start[:, None] >= end[None, :], axis=1)
    used = tile_start < end[-1]
    tile_expert = jnp.where(used, jnp.minimum(owner, num_experts - 1), -1).astype(jnp.int32)
    row_valid = jnp.zeros((tiles * b,), bool).at[dest].set(True).reshape(tiles, b)
    return dest, Routing(tile_expert, row_valid)


class SparseMoE(nnx.Module):
    """Mixtral's block_sparse_moe: `gate` (router Dense d -> E) and `experts`."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        self.num_experts, self.top_k = config.num_experts, config.experts_per_token
        self.gate = Dense(config.hidden_size, config.num_experts, dtype=dtype, rngs=rngs)
        self.experts = Experts(config, dtype=dtype, rngs=rngs)
        # "grouped" (the default) or "all" (every expert on every token, masked: a reference
        # and a baseline for the grouped path; not a quantized model's path)
        self.strategy = "grouped"

    def routing(self, x):
        """x: [b, t, d] -> (weights [T, k], experts [T, k]) for the T = b*t tokens."""
        return route(self.gate(x.reshape(-1, x.shape[-1]), out_dtype=jnp.float32), self.top_k)

    def __call__(self, x):
        """x: [b, t, d] -> [b, t, d]."""
        shape = x.shape
        xt = x.reshape(-1, shape[-1])
        weights, experts = self.routing(x)
        if self.strategy == "all":
            return self._all_experts(xt, weights, experts).reshape(shape)
        tokens, k = experts.shape
        a = tokens * k
        b = 1 if a <= DECODE_ASSIGNMENTS else TILE_ROWS
        dest, routing = tile_layout(experts.reshape(-1), self.num_experts, b)
        token_of = jnp.repeat(jnp.arange(tokens), k)
        rows = jnp.zeros((routing.row_valid.size, shape[-1]), x.dtype).at[dest].set(xt[token_of])
        y = self.experts(rows.reshape(-1, b, shape[-1]), routing).reshape(-1, shape[-1])
        # each assignment's output, weighted, summed into its token in float32
        contrib = y[dest].astype(jnp.float32) * weights.reshape(-1, 1)
        out = jnp.zeros((tokens, shape[-1]), jnp.float32).at[token_of].add(contrib)
        return out.astype(x.dtype).reshape(shape)

    def _all_experts(self, xt, weights, experts):
        ex = self.experts
        if not all(isinstance(p, ExpertDense) for p in (ex.w1, ex.w2, ex.w3)):
            raise ValueError("SparseMoE.strategy='all' needs dense experts; a quantized model "
                             "runs the grouped path")
        h = jax.nn.silu(ex.w1.dense_all(xt)) * ex.w3.dense_all(xt)  # [E, T, f]
        k2 = ex.w2.kernel[...]
        y = jnp.einsum("etf,efd->etd", h.astype(k2.dtype), k2,
                       preferred_element_type=jnp.float32).astype(k2.dtype)
        # dense combine weights [T, E]: zero for the experts a token is not routed to
        combine = jnp.zeros((xt.shape[0], self.num_experts), jnp.float32)
        combine = combine.at[jnp.arange(xt.shape[0])[:, None], experts].add(weights)
        return jnp.einsum("etd,te->td", y.astype(jnp.float32), combine).astype(xt.dtype)
