"""Load Hugging Face *Flax* Llama checkpoints: `config.json` + `flax_model.msgpack`, or sharded
`flax_model-0000x-of-0000y.msgpack` + `flax_model.msgpack.index.json` (as written by
transformers' `FlaxLlamaForCausalLM.save_pretrained`).

Their tree is Flax Linen layout: `model/embed_tokens/embedding`,
`model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel` ([in, out], already our layout),
`model/layers/<i>/mlp/{gate,up,down}_proj/kernel`, the norms' `weight`, `model/norm/weight`,
and `lm_head/kernel` unless tied. Shards are read one at a time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import numpy as np
from flax import serialization

from any4_jax.models.llama.convert_hf import read_hf_config
from any4_jax.models.llama.params import (
    TensorInfo,
    abstract_model,
    assemble,
    check_tensors,
)
from any4_jax.models.llama.safetensors_io import (
    CheckpointError,
    indexed_shards,
    read_weight_map,
)

SINGLE = "flax_model.msgpack"
INDEX = "flax_model.msgpack.index.json"
_LAYER = re.compile(r"^model/layers/(\d+)/(self_attn|mlp)/(\w+_proj)/kernel$")
_NORM = re.compile(r"^model/layers/(\d+)/(input_layernorm|post_attention_layernorm)/weight$")


def is_flax_dir(path) -> bool:
    return os.path.isfile(os.path.join(path, SINGLE)) or os.path.isfile(
        os.path.join(path, INDEX))


def flax_name_to_path(name: str) -> tuple | None:
    """'model/layers/3/self_attn/q_proj/kernel' -> ('layers', 3, 'self_attn', 'q_proj',
    'kernel'); None for entries the model does not use."""
    if m := _LAYER.match(name):
        return ("layers", int(m[1]), m[2], m[3], "kernel")
    if m := _NORM.match(name):
        return ("layers", int(m[1]), m[2], "weight")
    return {"model/embed_tokens/embedding": ("embed_tokens", "embedding"),
            "model/norm/weight": ("norm", "weight"),
            "lm_head/kernel": ("lm_head", "kernel")}.get(name)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, name))
        else:
            out[name] = v
    return out


def unflatten(flat: dict[str, object]) -> dict:
    out: dict = {}
    for name, v in flat.items():
        d = out
        *head, last = name.split("/")
        for k in head:
            d = d.setdefault(k, {})
        d[last] = v
    return out


def shard_files(path) -> list[str]:
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        return indexed_shards(path, index, "Flax checkpoint")
    single = os.path.join(path, SINGLE)
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX}")


def read_shard(file: str) -> dict[str, np.ndarray]:
    """One msgpack file -> {"model/layers/0/...": array} (flattened with '/')."""
    try:
        with open(file, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None
    try:
        tree = serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001 - msgpack raises many types on bad bytes
        raise CheckpointError(
            f"{file}: not a readable Flax msgpack file ({type(e).__name__}: {e}); it is "
            "truncated or corrupt (re-download it)") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{file}: the msgpack root is {type(tree).__name__}, not a dict; "
                              "the file is truncated or corrupt (re-download it)")
    if "params" in tree and isinstance(tree["params"], dict) and len(tree) == 1:
        tree = tree["params"]
    return flatten(tree)


def iter_flax_tensors(path) -> Iterator[tuple[str, np.ndarray]]:
    for f in shard_files(path):
        yield from read_shard(f).items()


def load_flax_params(path) -> dict:
    """The whole Linen-layout params tree of a checkpoint directory (nested dict)."""
    return unflatten(dict(iter_flax_tensors(path)))


def _indexed_names(path) -> list[str] | None:
    """The tensor names an index lists, in the tree's '/' form; None without an index, or if
    its names are not in that form (then the shards are checked as they are read)."""
    index = os.path.join(path, INDEX)
    if not os.path.isfile(index):
        return None
    names = [n.removeprefix("params/") for n in read_weight_map(index, "Flax checkpoint")]
    return names if any(flax_name_to_path(n) for n in names) else None


def _infos(tensors: dict[str, object], config) -> list[TensorInfo]:
    out = []
    for name, arr in tensors.items():
        if not ignored(name, config):
            a = np.asarray(arr)
            out.append(TensorInfo(name, flax_name_to_path(name), a.shape, a.dtype))
    return out


def ignored(name: str, config) -> bool:
    """lm_head/kernel of a tied checkpoint: the model reuses the embedding."""
    return config.tie_word_embeddings and name == "lm_head/kernel"


def load_flax_model(path, *, param_dtype=None):
    """(model, config) from a HF Flax directory; param_dtype None keeps the stored dtype.

    Names are checked against the index (when sharded) before any shard is read, and each
    shard's names, dtypes and shapes before any of its tensors is converted.
    """
    path = os.fspath(path)
    config = read_hf_config(path)
    files = shard_files(path)
    expected = abstract_model(config)
    names = _indexed_names(path)
    if names is not None:
        check_tensors(config, [TensorInfo(n, flax_name_to_path(n)) for n in names
                               if not ignored(n, config)], source=path, model=expected)
    first = read_shard(files[0])
    check_tensors(config, _infos(first, config), source=files[0], model=expected,
                  complete=len(files) == 1)
    dtype = param_dtype or next((str(i.dtype) for i in _infos(first, config)), "float32")

    def stream(pending: list):
        # one shard alive at a time: the first is handed over, not kept by this frame
        for i, f in enumerate(files):
            tensors = pending.pop() if i == 0 else read_shard(f)
            if i > 0:
                check_tensors(config, _infos(tensors, config), source=f, model=expected,
                              complete=False)
            for name, arr in tensors.items():
                if not ignored(name, config):
                    yield flax_name_to_path(name), np.asarray(arr)
            del tensors

    tensors = stream([first])
    del first
    return assemble(config, tensors, param_dtype=dtype, source=path), config
