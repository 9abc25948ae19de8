"""One entry point for every model source: `load_model(spec)`.

spec: None (the embedded SmolLM2, fetched by `any4 fetch`), a `.gguf` file, a Hugging Face
directory (config.json + safetensors, or Flax msgpack) or an any4-jax checkpoint. The format
is detected from the files.
"""

from __future__ import annotations

import dataclasses
import os
import time

from any4_jax import assets
from any4_jax.checkpoint import META_FILE, load_quantized
from any4_jax.models.llama.config import LlamaConfig
from any4_jax.models.llama.convert_flax import is_flax_dir, load_flax_model
from any4_jax.models.llama.convert_hf import load_hf_model
from any4_jax.models.llama.modules import Llama
from any4_jax.models.llama.safetensors_io import CheckpointError
from any4_jax.models.llama.tokenizer import Tokenizer, hf_tokenizer


@dataclasses.dataclass
class LoadedModel:
    model: Llama
    config: LlamaConfig
    tokenizer: Tokenizer
    source: str
    format: str  # "gguf" | "hf" (safetensors) | "flax" (msgpack) | "any4" (quantized)
    load_seconds: float


def default_model_path() -> str:
    p = assets.model_path()
    if not os.path.isfile(p):
        raise CheckpointError(
            f"the default model is not fetched yet ({p} missing): run `any4 fetch`, or name a "
            "model (a .gguf file or a Hugging Face directory)")
    return p


def detect_format(path: str) -> str:
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == b"GGUF":
            return "gguf"
        raise CheckpointError(f"{path}: a file but not GGUF (magic {magic!r}); pass a .gguf "
                              "file or a Hugging Face model directory")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, META_FILE)):
            return "any4"
        if os.path.isfile(os.path.join(path, "config.json")):
            has_st = any(os.path.isfile(os.path.join(path, f)) for f in
                         ("model.safetensors", "model.safetensors.index.json"))
            return "flax" if is_flax_dir(path) and not has_st else "hf"
        raise CheckpointError(f"{path}: a directory without config.json or any4.json; not a "
                              "Hugging Face model directory nor an any4-jax checkpoint (an "
                              "interrupted save leaves no any4.json)")
    raise CheckpointError(f"{path}: no such file or directory")


def load_model(spec: str | os.PathLike | None = None, *, param_dtype=None,
               mesh=None) -> LoadedModel:
    """Load a model with its tokenizer. `param_dtype` None: float32 for GGUF, the checkpoint's
    own dtype for Hugging Face directories. `mesh` (any4 checkpoints only): restore tensor
    parallel over it (see `load_quantized`)."""
    path = default_model_path() if spec is None else os.fspath(spec)
    fmt = detect_format(path)
    t0 = time.perf_counter()
    if fmt == "gguf":
        # gguf is needed only here: a machine without it still loads every other format
        from any4_jax.models.llama.convert_gguf import load_gguf_model

        model, config, tok = load_gguf_model(path, param_dtype=param_dtype)
    elif fmt == "any4":
        if param_dtype is not None:
            raise ValueError(f"{path} is a quantized checkpoint; its dtype is fixed at save "
                             "time (drop --dtype)")
        model, config, tok, _ = load_quantized(path, mesh=mesh)
    elif mesh is not None:
        raise ValueError(f"{path}: a sharded load reads any4 checkpoints; load this {fmt} "
                         "model whole and call nn.sharding.shard_model on it")
    elif fmt == "flax":
        tok = hf_tokenizer(path)
        model, config = load_flax_model(path, param_dtype=param_dtype)
    else:
        tok = hf_tokenizer(path)
        model, config = load_hf_model(path, param_dtype=param_dtype)
    return LoadedModel(model, config, tok, path, fmt, time.perf_counter() - t0)
