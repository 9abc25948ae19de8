"""Load a Hugging Face Llama/Mistral directory (config.json + safetensors) into our Flax Llama.

Weights are streamed shard by shard and tensor by tensor from memory maps; each torch-layout
[out, in] projection is transposed to the Flax [in, out] kernel as it is moved to the device,
so only one tensor beyond the model is ever held.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import numpy as np

from any4_jax.models.llama.config import LlamaConfig
from any4_jax.models.llama.params import assemble
from any4_jax.models.llama.safetensors_io import (
    CheckpointError,
    SafetensorsFile,
    indexed_shards,
)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight$")
_NORM = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")


def hf_name_to_path(name: str) -> tuple | None:
    """'model.layers.3.self_attn.q_proj.weight' -> ('layers', 3, 'self_attn', 'q_proj',
    'kernel'); None for tensors the model does not use (e.g. rotary inv_freq buffers)."""
    if m := _LAYER.match(name):
        return ("layers", int(m[1]), m[2], m[3], "kernel")
    if m := _NORM.match(name):
        return ("layers", int(m[1]), m[2], "weight")
    return {"model.embed_tokens.weight": ("embed_tokens", "embedding"),
            "model.norm.weight": ("norm", "weight"),
            "lm_head.weight": ("lm_head", "kernel")}.get(name)


def _torch_to_flax(path: tuple, arr: np.ndarray) -> np.ndarray:
    return arr.T if path[-1] == "kernel" else arr


def read_hf_config(path: str | os.PathLike) -> LlamaConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(
            f"{path}: no config.json; expected a Hugging Face model directory (config.json + "
            "model.safetensors or sharded model-0000x-of-0000y.safetensors + index)")
    try:
        with open(cfg_path) as fh:
            hf = json.load(fh)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    return LlamaConfig.from_hf(hf, name=os.path.basename(os.path.normpath(path)))


def weight_files(path: str | os.PathLike) -> list[str]:
    """The safetensors files of a HF directory, in order, with every indexed shard present."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        return indexed_shards(path, index, "safetensors")
    if os.path.isfile(single):
        return [single]
    others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".msgpack")))
    hint = (f" (found {others}: convert to safetensors, e.g. save_pretrained(..., "
            "safe_serialization=True))" if others else "")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


def _stream(files: list[str]) -> Iterator[tuple[tuple, np.ndarray]]:
    for f in files:
        st = SafetensorsFile(f)
        for name in st:
            p = hf_name_to_path(name)
            if p is not None:
                yield p, st.get(name)
        st.close()


def checkpoint_dtype(path: str | os.PathLike) -> str:
    with open(os.path.join(path, "config.json")) as fh:
        hf = json.load(fh)
    dt = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return {"float16": "float16", "bfloat16": "bfloat16"}.get(dt, "float32")


def load_hf_model(path: str | os.PathLike, *, param_dtype=None):
    """(model, config) from a HF directory; param_dtype None keeps the checkpoint's dtype."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    config = read_hf_config(path)
    files = weight_files(path)
    dt = param_dtype or checkpoint_dtype(path)
    if config.tie_word_embeddings:
        stream = ((p, a) for p, a in _stream(files) if p[0] != "lm_head")
    else:
        stream = _stream(files)
    model = assemble(config, stream, param_dtype=dt, source=path, convert=_torch_to_flax)
    return model, config
