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
from any4_jax.models.llama.params import (
    TensorInfo,
    abstract_model,
    assemble,
    check_tensors,
)
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


_REFETCH = "re-download it; for the default model run `any4 fetch`"
# rotary tables of old llama.cpp conversions: the model computes its own
_IGNORED = re.compile(r"^blk\.\d+\.attn_rot_embd(\.weight)?$")
_INT_TYPES = {"I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}
# the types gguf.quants.dequantize decodes (None: this gguf version does not say)
_traits = getattr(gguf.quants, "_type_traits", None)
_DECODABLE = (None if _traits is None else {t.name for t in _traits} | {"F32", "F16"})


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
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if magic != b"GGUF":
        raise CheckpointError(
            f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF'); the file is corrupt "
            f"or of another format ({_REFETCH})")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises bare ValueError/IndexError
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it is truncated or "
            f"corrupt ({_REFETCH})") from None


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
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: GGUF metadata does not describe a valid Llama ({e})"
                              ) from None


def _infos(reader, config: LlamaConfig, path: str):
    """What the GGUF header says of each tensor, in our layout (kernels [in, out] = ggml's
    (ne0, ne1)), for `check_tensors`; undecodable types are named here."""
    for t in reader.tensors:
        if _IGNORED.match(t.name):
            continue
        if t.name == "rope_freqs.weight":
            raise CheckpointError(
                f"{path}: carries rope_freqs.weight (Llama 3.1-style rope scaling), which the "
                "GGUF loader does not apply; load the model's Hugging Face directory instead")
        kind = t.tensor_type.name
        if kind not in _INT_TYPES and _DECODABLE is not None and kind not in _DECODABLE:
            raise CheckpointError(
                f"{path}: tensor {t.name} is stored as GGML type {kind}, which the gguf "
                "package cannot decode; convert the model with F32, F16, BF16 or a Q*/IQ* type")
        p = gguf_name_to_path(t.name)
        ne = tuple(int(d) for d in t.shape)
        yield TensorInfo(t.name, p, ne if p and p[-1] == "kernel" else ne[::-1],
                         np.dtype(_INT_TYPES.get(kind, np.float32)))


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
    # the tokenizer and every tensor's name, type and shape before any tensor is decoded
    tokenizer = gguf_tokenizer(fields, source=path)
    model = abstract_model(config, param_dtype or "float32")
    check_tensors(config, _infos(reader, config, path), source=path, model=model)

    def stream():
        for t in reader.tensors:
            if _IGNORED.match(t.name):
                continue
            p = gguf_name_to_path(t.name)
            try:
                w = gguf.quants.dequantize(t.data, t.tensor_type)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(
                    f"{path}: tensor {t.name} ({t.tensor_type.name}) could not be decoded: "
                    f"{e}; {_REFETCH}") from None
            w = np.asarray(w, np.float32)
            if p[-2:] == ("q_proj", "kernel"):
                w = unpermute_rows(w, config.num_heads)
            elif p[-2:] == ("k_proj", "kernel"):
                w = unpermute_rows(w, config.num_kv_heads)
            yield p, (w.T if p[-1] == "kernel" else w)

    model = assemble(config, stream(), param_dtype=param_dtype or "float32", source=path,
                     model=model)
    return model, config, tokenizer
