"""The Llama decoder in Flax NNX.

Parameter paths mirror Hugging Face names (`layers[i].self_attn.q_proj.kernel`), so loaders
are a renaming. Every projection a quantizer may replace is a `Dense`; swapping that one class
(for `QuantDense`) is all the quantization issue needs, the model code stays as it is.
Projections of one input (q/k/v, gate/up) go through `project`, which lets a layer class that
can compute them together (`apply_shared`) do so.

Dtype policy: parameters and activations in `param_dtype` (bf16 or f32); RMSNorm statistics,
rotary angles, attention scores and softmax in float32; logits float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from any4_jax.models.llama.config import LlamaConfig, rope_inv_freq

_INIT_STD = 0.02
# Query/key block of the blocked attention (fastest of 64/128/256/512 on a 2-core CPU at
# t=2048).
ATTN_BLOCK = 256


def _normal(rngs: nnx.Rngs, shape, dtype):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * _INIT_STD).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel, kernel [in_features, out_features]; float32 accumulation.

    The one layer class a quantizer replaces (same call signature: `x [..., K] -> [..., N]`).
    """

    def __init__(self, in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), dtype))

    def __call__(self, x, *, out_dtype=None):
        """out_dtype: None = the kernel's dtype (float32 for logits)."""
        k = self.kernel[...]
        y = jnp.einsum("...k,kn->...n", x.astype(k.dtype), k,
                       preferred_element_type=jnp.float32)
        return y.astype(out_dtype or k.dtype)


def project(layers, x) -> list:
    """[layer(x) for layer in layers]: projections of one input. A layer class with an
    `apply_shared(layers, x)` static method (a quantized Dense: one kernel call for all of
    them) computes them together; the results are the same."""
    shared = getattr(type(layers[0]), "apply_shared", None)
    if shared is not None and all(type(layer) is type(layers[0]) for layer in layers):
        return shared(layers, x)
    return [layer(x) for layer in layers]


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (vocab_size, dim), dtype))

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x):
        """Tied output head: float32 logits `x @ embedding.T`."""
        e = self.embedding[...]
        x = x.astype(e.dtype)
        if math.prod(x.shape[:-1]) == 1:
            # one row (decoding): written as a product with the transposed table, which XLA:CPU
            # fuses into a loop split over its threads; as a dot of one row its SmolLM2 head
            # took 1.3x (float32) to 18x (bf16) as long (docs/cpu_kernel_notes.md, v8)
            y = jnp.matmul(x.reshape(1, -1), e.T, preferred_element_type=jnp.float32)
            return y.reshape(*x.shape[:-1], e.shape[0])
        return jnp.einsum("...d,vd->...v", x, e, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        return w * x32.astype(w.dtype)


def rope_cos_sin(inv_freq, positions):
    """positions: [..., t] int -> cos, sin: [..., t, head_dim] float32 (halves repeated)."""
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., t, hd/2]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
    """x: [b, t, h, d]; cos/sin: [b or 1, t, d]. Hugging Face's rotate-half layout."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rot * sin[:, :, None]).astype(x.dtype)


def blocked_causal_attention(q, k, v, *, window=None, block=ATTN_BLOCK):
    """Causal (optionally sliding-window) attention in query x key blocks, online softmax.

    q: [b, t, kvh, g, d], k/v: [b, t, kvh, d], positions 0..t-1 -> [b, t, kvh, g, d].
    Blocks above the diagonal (and outside the window) are never computed and no [t, t]
    score matrix is materialised: on a 2-core CPU at t=2048 this is 8x faster than the dense
    form, whose softmax passes over the full score matrix are memory-bound. The g query heads
    sharing a KV head are folded into the matmul rows (M = g * block).
    """
    b, t, kvh, g, d = q.shape
    tp = -(-t // block) * block
    if tp != t:
        # padded keys sit after every real query, so causality masks them
        pad = [(0, 0), (0, tp - t)]
        q = jnp.pad(q, pad + [(0, 0)] * 3)
        k = jnp.pad(k, pad + [(0, 0)] * 2)
        v = jnp.pad(v, pad + [(0, 0)] * 2)
    nb = tp // block
    q = (q.astype(jnp.float32) * (1.0 / np.sqrt(d))).astype(q.dtype)
    qb = q.reshape(b, nb, block, kvh, g, d).transpose(1, 0, 3, 4, 2, 5)
    qb = qb.reshape(nb, b, kvh, g * block, d)  # [n, b, kvh, m = g * bq, d]
    kb = k.reshape(b, nb, block, kvh, d).transpose(1, 0, 3, 2, 4)  # [n, b, kvh, bk, d]
    vb = v.reshape(b, nb, block, kvh, d).transpose(1, 0, 3, 2, 4)
    q_off = jnp.tile(jnp.arange(block), g)  # position within the block of each row m
    k_off = jnp.arange(block)

    def q_block(i):
        qi = qb[i]
        q_pos = i * block + q_off

        def body(j, carry):
            m, den, acc = carry
            s = jnp.einsum("bkmd,bksd->bkms", qi, kb[j], preferred_element_type=jnp.float32)
            k_pos = j * block + k_off
            ok = k_pos[None, :] <= q_pos[:, None]
            if window is not None:
                ok &= k_pos[None, :] > q_pos[:, None] - window
            s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            pv = jnp.einsum("bkms,bksd->bkmd", p.astype(vb.dtype), vb[j],
                            preferred_element_type=jnp.float32)
            return m_new, den * corr + p.sum(-1), acc * corr[..., None] + pv

        init = (jnp.full((b, kvh, g * block), -jnp.inf, jnp.float32),
                jnp.zeros((b, kvh, g * block), jnp.float32),
                jnp.zeros((b, kvh, g * block, d), jnp.float32))
        j0 = 0 if window is None else jnp.maximum(0, (i * block - window + 1) // block)
        _, den, acc = lax.fori_loop(j0, i + 1, body, init)
        return acc / den[..., None]  # [b, kvh, m, d]

    out = lax.map(q_block, jnp.arange(nb))  # [n, b, kvh, g * bq, d]
    out = out.reshape(nb, b, kvh, g, block, d).transpose(1, 0, 4, 2, 3, 5)
    return out.reshape(b, tp, kvh, g, d)[:, :t].astype(v.dtype)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.sliding_window = c.sliding_window
        d, hd = c.hidden_size, c.head_dim
        self.q_proj = Dense(d, c.num_heads * hd, dtype=dtype, rngs=rngs)
        self.k_proj = Dense(d, c.num_kv_heads * hd, dtype=dtype, rngs=rngs)
        self.v_proj = Dense(d, c.num_kv_heads * hd, dtype=dtype, rngs=rngs)
        self.o_proj = Dense(c.num_heads * hd, d, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, q_pos, cache=None, start=None, mask=None):
        """x: [b, t, d]; q_pos: [t] absolute positions of the queries ([b, t] with `mask`).

        cache: None (keys are this call's tokens) or (k, v) each [b, s_max, kv_heads, hd],
        written at `start` and attended in full (unwritten slots are masked by position).
        mask: None (causal) or [b, t, t] bool, which keys each query sees (packed sequences,
        `Llama.hidden(segments=...)`; no cache).
        Returns (y [b, t, d], new cache or None).
        """
        b, t, _ = x.shape
        h, kvh, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = project((self.q_proj, self.k_proj, self.v_proj), x)
        q = apply_rope(q.reshape(b, t, h, hd), cos, sin)
        k = apply_rope(k.reshape(b, t, kvh, hd), cos, sin)
        v = v.reshape(b, t, kvh, hd)
        g = h // kvh
        q = q.reshape(b, t, kvh, g, hd)  # [b, t, kvh, g, hd]
        if cache is None and mask is None and t > ATTN_BLOCK:
            o = blocked_causal_attention(q, k, v, window=self.sliding_window)
            return self.o_proj(o.reshape(b, t, h * hd)), None
        if cache is not None:
            kc, vc = cache
            k = jax.lax.dynamic_update_slice_in_dim(kc, k.astype(kc.dtype), start, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(vc, v.astype(vc.dtype), start, axis=1)
            cache = (k, v)
            k_pos = jnp.arange(k.shape[1])
        else:
            k_pos = q_pos
        s = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                       preferred_element_type=jnp.float32) * (1.0 / np.sqrt(hd))
        if mask is not None:
            allowed = mask  # [b, t, s]
            if self.sliding_window is not None:
                allowed &= q_pos[:, None, :] > q_pos[:, :, None] - self.sliding_window
            allowed = allowed[:, None, None]
        else:
            allowed = k_pos[None, :] <= q_pos[:, None]  # [t, s]
            if self.sliding_window is not None:
                allowed &= k_pos[None, :] > q_pos[:, None] - self.sliding_window
        s = jnp.where(allowed, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        o = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=jnp.float32)
        o = o.astype(x.dtype).reshape(b, t, h * hd)
        return self.o_proj(o), cache


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Dense(d, f, dtype=dtype, rngs=rngs)
        self.up_proj = Dense(d, f, dtype=dtype, rngs=rngs)
        self.down_proj = Dense(f, d, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        gate, up = project((self.gate_proj, self.up_proj), x)
        return self.down_proj(jax.nn.silu(gate) * up)


class Block(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, eps, dtype=dtype)
        if config.is_moe:  # Mixtral: the experts in place of the MLP (Hugging Face's name)
            from any4_jax.models.llama.moe import SparseMoE

            self.block_sparse_moe = SparseMoE(config, dtype=dtype, rngs=rngs)
        else:
            self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, q_pos, cache=None, start=None, mask=None):
        a, cache = self.self_attn(self.input_layernorm(x), cos, sin, q_pos, cache, start, mask)
        x = x + a
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return x + ffn(self.post_attention_layernorm(x)), cache


class Llama(nnx.Module):
    """Causal LM. `Llama(config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))`.

    Build without memory with `nnx.eval_shape(lambda: Llama(...))`; loaders fill it.
    """

    def __init__(self, config: LlamaConfig, *, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        dt = jnp.dtype(param_dtype)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dt, rngs=rngs)
        self.layers = nnx.List([Block(config, dtype=dt, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dt)
        self.lm_head = (None if config.tie_word_embeddings else
                        Dense(config.hidden_size, config.vocab_size, dtype=dt, rngs=rngs))

    @property
    def dtype(self):
        return self.embed_tokens.embedding.get_value().dtype

    def embed_inputs(self, tokens, *, start=0):
        """tokens: [b, t] -> (x [b, t, d], extras): `layer(x, *extras)` runs one block.

        The block-by-block protocol that sequential calibration uses.
        """
        q_pos = start + jnp.arange(tokens.shape[1])
        cos, sin = rope_cos_sin(jnp.asarray(rope_inv_freq(self.config)), q_pos[None])
        return self.embed_tokens(tokens), (cos, sin, q_pos)

    def hidden(self, tokens, *, start=0, cache=None, segments=None, positions=None):
        """tokens: [b, t] -> final-norm hidden states [b, t, d], new cache (or None).

        `start` (int or traced scalar) is the position of tokens[:, 0]; with a cache the
        keys/values are written there.

        Packed sequences (no cache): `segments` [b, t] int and `positions` [b, t] int. A token
        sees the earlier tokens of its own segment and of segment 0, a prefix they share:
        [prefix (0), cont A (1), cont B (2)] with B's positions continuing the prefix's scores
        B exactly as [prefix, cont B] alone, one prefix for several continuations.
        """
        mask = None
        if segments is not None:
            if positions is None or cache is not None:
                raise ValueError("segments need positions, and no cache")
            idx = jnp.arange(tokens.shape[1])
            seg_k, seg_q = segments[:, None, :], segments[:, :, None]
            mask = (idx[None, :] <= idx[:, None])[None] & ((seg_k == seg_q) | (seg_k == 0))
            x = self.embed_tokens(tokens)
            cos, sin = rope_cos_sin(jnp.asarray(rope_inv_freq(self.config)), positions)
            q_pos = positions
        else:
            x, (cos, sin, q_pos) = self.embed_inputs(tokens, start=start)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, cos, sin, q_pos, None if cache is None else cache[i], start,
                         mask)
            new_cache.append(c)
        return self.norm(x), (None if cache is None else tuple(new_cache))

    def logits(self, h):
        """h: [..., d] -> float32 logits [..., vocab]."""
        if self.lm_head is None:
            return self.embed_tokens.attend(h)
        return self.lm_head(h, out_dtype=jnp.float32)

    def __call__(self, tokens, *, start=0, cache=None):
        """tokens: [b, t] -> (logits float32 [b, t, vocab], new cache or None)."""
        h, cache = self.hidden(tokens, start=start, cache=cache)
        return self.logits(h), cache

    def init_cache(self, batch: int, max_len: int, dtype=None):
        """Zeroed KV cache: per layer (k, v), each [batch, max_len, kv_heads, head_dim]."""
        c = self.config
        dt = dtype or self.dtype
        shape = (batch, max_len, c.num_kv_heads, c.head_dim)
        return tuple((jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(c.num_layers))
