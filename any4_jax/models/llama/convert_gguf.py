"""Load a llama.cpp GGUF file (Llama architecture) into our Flax Llama, with its tokenizer.

Quantized tensors are dequantized with the `gguf` package. llama.cpp's converter permutes the
rows of the Q and K projections (interleaved rotary pairs); we undo it to get Hugging Face's
rotate-half layout, which our rotary embedding uses.
"""

from __future__ import annotations

import os
import re

import gguf
import numpy as np

from any4_jax.models.llama.config import LlamaConfig
from any4_jax.models.llama.params import assemble
from any4_jax.models.llama.safetensors_io import CheckpointError
from any4_jax.models.llama.tokenizer import Tokenizer, gguf_tokenizer

_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
_BLOCK_NAMES = {
    "attn_q": ("self_attn", "q_proj", "kernel"), "attn_k": ("self_attn", "k_proj", "kernel"),
    "attn_v": ("self_attn", "v_proj", "kernel"),
    "attn_output": ("self_attn", "o_proj", "kernel"),
    "ffn_gate": ("mlp", "gate_proj", "kernel"), "ffn_up": ("mlp", "up_proj", "kernel"),
    "ffn_down": ("mlp", "down_proj", "kernel"),
    "attn_norm": ("input_layernorm", "weight"), "ffn_norm": ("post_attention_layernorm", "weight"),
}


def gguf_name_to_path(name: str) -> tuple | None:
    if m := _BLOCK.match(name):
        sub = _BLOCK_NAMES.get(m[2])
        return None if sub is None else ("layers", int(m[1]), *sub)
    return {"token_embd.weight": ("embed_tokens", "embedding"),
            "output_norm.weight": ("norm", "weight"),
            "output.weight": ("lm_head", "kernel")}.get(name)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` on a [n_heads * head_dim, in] projection."""
    out_dim = w.shape[0]
    return (w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _reader(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/IndexError on bad bytes
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it is truncated or "
            "corrupt, fetch it again (`any4 fetch`)") from None


def _fields(reader) -> dict:
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception:  # noqa: BLE001 - a field we cannot decode is one we do not need
            continue
    return out


def gguf_config(fields: dict, *, name: str) -> LlamaConfig:
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(
            f"{name}: GGUF architecture {arch!r} is not supported (only 'llama', which also "
            "covers Mistral and SmolLM2)")
    a = "llama."
    try:
        heads = int(fields[a + "attention.head_count"])
        hidden = int(fields[a + "embedding_length"])
        eos = fields.get("tokenizer.ggml.eos_token_id")
        return LlamaConfig(
            name=name,
            vocab_size=int(fields.get(a + "vocab_size")
                           or len(fields["tokenizer.ggml.tokens"])),
            hidden_size=hidden,
            intermediate_size=int(fields[a + "feed_forward_length"]),
            num_layers=int(fields[a + "block_count"]),
            num_heads=heads,
            num_kv_heads=int(fields.get(a + "attention.head_count_kv", heads)),
            head_dim=int(fields.get(a + "rope.dimension_count", hidden // heads)),
            rope_theta=float(fields.get(a + "rope.freq_base", 10000.0)),
            rms_norm_eps=float(fields.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings=False,  # decided from the tensors below
            max_position_embeddings=int(fields.get(a + "context_length", 4096)),
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=None if eos is None else int(eos),
        )
    except KeyError as e:
        raise CheckpointError(f"{name}: GGUF metadata lacks {e.args[0]!r}") from None


def load_gguf_model(path: str | os.PathLike, *, param_dtype=None
                    ) -> tuple[object, LlamaConfig, Tokenizer]:
    """(model, config, tokenizer) from a GGUF file; param_dtype None = float32."""
    path = os.fspath(path)
    reader = _reader(path)
    fields = _fields(reader)
    name = os.path.splitext(os.path.basename(path))[0]
    config = gguf_config(fields, name=name)
    names = {t.name for t in reader.tensors}
    config = config.replace(tie_word_embeddings="output.weight" not in names)

    def stream():
        for t in reader.tensors:
            p = gguf_name_to_path(t.name)
            if p is None:
                continue
            try:
                w = gguf.quants.dequantize(t.data, t.tensor_type)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(
                    f"{path}: tensor {t.name} ({t.tensor_type.name}) could not be decoded: "
                    f"{e}") from None
            w = np.asarray(w, np.float32)
            if p[-2:] == ("q_proj", "kernel"):
                w = unpermute_rows(w, config.num_heads)
            elif p[-2:] == ("k_proj", "kernel"):
                w = unpermute_rows(w, config.num_kv_heads)
            yield p, (w.T if p[-1] == "kernel" else w)

    model = assemble(config, stream(), param_dtype=param_dtype or "float32", source=path)
    return model, config, gguf_tokenizer(fields, source=path)
