"""Load a Hugging Face Llama/Mistral/Mixtral directory (config.json + safetensors) into our
Flax Llama.

Weights are streamed shard by shard and tensor by tensor from memory maps; each torch-layout
[out, in] projection is transposed to the Flax [in, out] kernel as it is moved to the device,
so only one tensor beyond the model is ever held. Mixtral's experts are stored one tensor per
expert (`block_sparse_moe.experts.{e}.w1.weight`, the hub layout, which transformers also
writes); they are stacked into one [E, in, out] kernel per projection as the last expert of a
layer arrives, so at most one layer's stacks are held beyond the model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import numpy as np

from any4_jax.models.llama.config import LlamaConfig
from any4_jax.models.llama.params import (
    TensorInfo,
    abstract_model,
    assemble,
    check_tensors,
    is_float,
)
from any4_jax.models.llama.safetensors_io import (
    CheckpointError,
    SafetensorsFile,
    indexed_shards,
)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight$")
_NORM = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")
_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def expert_piece(name: str) -> tuple[tuple, int] | None:
    """'model.layers.3.block_sparse_moe.experts.5.w1.weight' -> (stacked kernel path, 5)."""
    if m := _EXPERT.match(name):
        return ("layers", int(m[1]), "block_sparse_moe", "experts", m[3], "kernel"), int(m[2])
    return None


def hf_name_to_path(name: str) -> tuple | None:
    """'model.layers.3.self_attn.q_proj.weight' -> ('layers', 3, 'self_attn', 'q_proj',
    'kernel'); None for names no rule maps (see `ignored` for those skipped on purpose)."""
    if m := _LAYER.match(name):
        return ("layers", int(m[1]), m[2], m[3], "kernel")
    if m := _NORM.match(name):
        return ("layers", int(m[1]), m[2], "weight")
    if m := _ROUTER.match(name):
        return ("layers", int(m[1]), "block_sparse_moe", "gate", "kernel")
    return {"model.embed_tokens.weight": ("embed_tokens", "embedding"),
            "model.norm.weight": ("norm", "weight"),
            "lm_head.weight": ("lm_head", "kernel")}.get(name)


def _torch_to_flax(path: tuple, arr: np.ndarray) -> np.ndarray:
    # stacked expert kernels arrive already [E, in, out] (see _stream)
    return arr.T if path[-1] == "kernel" and arr.ndim == 2 else arr


def read_hf_config(path: str | os.PathLike) -> LlamaConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(
            f"{path}: no config.json; expected a Hugging Face model directory (config.json + "
            "model.safetensors or sharded model-0000x-of-0000y.safetensors + index)")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            hf = json.load(fh)
    except OSError as e:
        raise CheckpointError(f"{cfg_path}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e}); the file is damaged "
                              "(re-download it)") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_path}: a JSON {type(hf).__name__}, not the object of a "
                              "Hugging Face config (re-download it)")
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


def ignored(name: str, config: LlamaConfig) -> bool:
    """Tensors a Hugging Face directory may hold that the model rightly does not load: rotary
    buffers of older checkpoints, and lm_head when the embeddings are tied."""
    return bool(_IGNORED.search(name)) or (config.tie_word_embeddings
                                            and name == "lm_head.weight")


def _infos(shards: list[SafetensorsFile], config: LlamaConfig) -> Iterator[TensorInfo]:
    experts: dict[tuple, dict[int, tuple]] = {}  # stacked path -> {expert: (shape, dtype)}
    for st in shards:
        for name in st:
            if ignored(name, config):
                continue
            piece = expert_piece(name) if config.is_moe else None
            if piece is not None:
                experts.setdefault(piece[0], {})[piece[1]] = (st.shape(name), st.dtype(name))
                continue
            p = hf_name_to_path(name)
            shape = st.shape(name)
            yield TensorInfo(name, p, shape[::-1] if p and p[-1] == "kernel" else shape,
                             st.dtype(name))
    for path, got in experts.items():
        yield _stacked_info(path, got, config)


def _stacked_info(path: tuple, got: dict[int, tuple], config: LlamaConfig) -> TensorInfo:
    """One TensorInfo for the experts of a stacked projection: all present and alike."""
    e = config.num_experts
    name = ".".join(["model", *map(str, path[:4])]) + ".{}." + path[4] + ".weight"
    extra = sorted(i for i in got if i >= e)
    if extra:
        return TensorInfo(name.format(extra[0]), None)  # reported: not in the config
    missing = [name.format(i) for i in range(e) if i not in got]
    if missing:
        raise CheckpointError(f"{len(missing)} expert tensors missing, e.g. {missing[:3]}; "
                              f"the config has num_local_experts={e}: the checkpoint is "
                              "incomplete or the config is wrong")
    shapes = sorted({tuple(shape) for shape, _ in got.values()})
    if len(shapes) > 1:
        raise CheckpointError(f"the experts of {name.format('*')} have different shapes "
                              f"{shapes}; the checkpoint is damaged")
    out, inp = shapes[0]
    dtypes = [dt for _, dt in got.values() if not is_float(dt)] or [got[0][1]]
    return TensorInfo(name.format("*"), path, (e, inp, out), dtypes[0])


def _stream(shards: list[SafetensorsFile], config: LlamaConfig
            ) -> Iterator[tuple[tuple, np.ndarray]]:
    pending: dict[tuple, dict[int, np.ndarray]] = {}  # stacked path -> {expert: [in, out]}
    for st in shards:
        for name in st:
            if ignored(name, config):
                continue
            piece = expert_piece(name) if config.is_moe else None
            if piece is None:
                yield hf_name_to_path(name), st.get(name)
                continue
            path, e = piece
            arr = st.get(name)
            if not is_float(arr.dtype):
                yield path, arr  # assemble names the dtype
                continue
            got = pending.setdefault(path, {})
            got[e] = np.asarray(arr).T
            if len(got) == config.num_experts:
                yield path, np.stack([got[i] for i in range(config.num_experts)])
                del pending[path]
        st.close()


def checkpoint_dtype(path: str | os.PathLike) -> str:
    with open(os.path.join(path, "config.json")) as fh:
        hf = json.load(fh)
    dt = hf.get("dtype") or hf.get("torch_dtype")
    return dt if dt in ("float16", "bfloat16") else "float32"


def load_hf_model(path: str | os.PathLike, *, param_dtype=None):
    """(model, config) from a HF directory; param_dtype None keeps the checkpoint's dtype."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    config = read_hf_config(path)
    dt = param_dtype or checkpoint_dtype(path)
    # every header first: a damaged shard, an unknown or integer tensor or a wrong shape
    # fails here, before any tensor is converted
    shards = [SafetensorsFile(f) for f in weight_files(path)]
    model = abstract_model(config, dt)
    check_tensors(config, _infos(shards, config), source=path, model=model)
    model = assemble(config, _stream(shards, config), param_dtype=dt, source=path,
                     convert=_torch_to_flax, model=model)
    return model, config
