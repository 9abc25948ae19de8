"""Quantized checkpoints: an orbax checkpoint of the model state plus JSON metadata.

Layout of a checkpoint directory:
  any4.json     metadata: format version, package versions, model config, per-layer
                quantization metadata, quantization and calibration settings, tokenizer info
  state/        orbax (StandardCheckpointer) save of the model's arrays
  tokenizer/    the tokenizer's own files

Writing is atomic: everything goes to a hidden sibling directory, `any4.json` is written last,
and the directory is renamed into place, so an interrupted run never leaves a directory that
looks complete. Loading validates the metadata and names what is wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from tokenizers import Tokenizer as HFTok

from any4_jax import distributed, outputs
from any4_jax.models.llama.config import LlamaConfig
from any4_jax.models.llama.modules import Llama
from any4_jax.models.llama.tokenizer import Tokenizer, hf_tokenizer
from any4_jax.nn.layers import dense_layers, set_layer
from any4_jax.nn.qdense import QuantDense
from any4_jax.nn.sharding import plan_model, target_shardings

FORMAT_VERSION = 1
META_FILE = "any4.json"


class CheckpointFormatError(ValueError):
    """A quantized checkpoint is incomplete, from an incompatible version, or inconsistent."""


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("any4-jax", "jax", "jaxlib", "flax", "orbax-checkpoint", "numpy"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


CHECKPOINT_ENTRIES = frozenset({META_FILE, "state", "tokenizer"})  # all a checkpoint holds


def is_quantized_checkpoint(path) -> bool:
    """Whether `path` is an any4 checkpoint directory (what overwrite may replace), recognised
    by its metadata: an any4.json holding a format_version and the quantized layers, and
    nothing beside state/ and tokenizer/ (a user's directory that holds a copy of an any4.json
    among its own files is not one)."""
    f = os.path.join(path, META_FILE)
    if not os.path.isfile(f):
        return False
    try:
        if not set(os.listdir(path)) <= CHECKPOINT_ENTRIES:
            return False
    except OSError:
        return False
    try:
        with open(f) as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format_version" in meta and "quantized_layers" in meta


def check_output(path, *, overwrite: bool = False) -> Path:
    """Checks, before any work, that a checkpoint may be written at `path`: absent, or (with
    overwrite) an any4 checkpoint; never a file or another directory. Returns the absolute
    path; an `outputs.OutputError` naming the fix otherwise."""
    final = Path(path).absolute()
    # what a killed run left beside the target first: a previous checkpoint it had moved
    # aside is put back, and is then what `overwrite` is about
    outputs.remove_debris(final, is_ours=is_quantized_checkpoint)
    return outputs.check_dir_output(final, overwrite=overwrite, is_ours=is_quantized_checkpoint)


def _save_tokenizer(tokenizer, directory: Path) -> dict:
    directory.mkdir()
    backend = tokenizer._tok
    info = {"bos_id": tokenizer.bos_id, "eos_ids": list(tokenizer.eos_ids),
            "add_bos": tokenizer.add_bos}
    if hasattr(backend, "encode_batch") and hasattr(backend, "save"):
        backend.save(str(directory / "tokenizer.json"))
        return {"kind": "tokenizers", **info}
    backend.save_pretrained(str(directory))
    return {"kind": "transformers", **info}


def _load_tokenizer(directory: str, info: dict):
    if info.get("kind") == "transformers":
        return hf_tokenizer(directory)
    f = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(f):
        raise CheckpointFormatError(f"{directory}: tokenizer.json missing")
    return Tokenizer(HFTok.from_file(f), bos_id=info.get("bos_id"),
                     eos_ids=tuple(info.get("eos_ids", ())), add_bos=bool(info.get("add_bos")),
                     source=directory)


def quantized_layer_meta(model) -> dict[str, dict]:
    return {p: layer.checkpoint_meta() for p, layer in dense_layers(model)
            if isinstance(layer, QuantDense)}


def _canonical_state(model) -> dict:
    """The model's state as a pure dict, with every QuantDense in the canonical layout (a
    layer prepared for a kernel is converted back, so checkpoints never depend on a kernel)."""
    _, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    for path, layer in dense_layers(model):
        if isinstance(layer, QuantDense) and layer.layout != "canonical":
            node = pure
            for part in path.split("."):
                node = node[int(part)] if part.isdigit() and int(part) in node else node[part]
            qw = layer.qweight
            node.update(codes=qw.codes, lut=qw.lut, scales=qw.scales, zeros=qw.zeros)
    return pure


def _global_state(pure: dict) -> dict:
    """In a multi-process run, every array one process holds whole (a model quantized in
    every process, `ptq/rows.py`, or its unquantized tensors) as a global replicated array, so
    orbax's collective save writes it once; arrays already global are left as they are."""
    if jax.process_count() == 1:
        return pure
    mesh = distributed.process_mesh()

    def put(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return a
        return distributed.replicated(a, mesh)

    return jax.tree.map(put, pure)


def save_quantized(path, model, *, tokenizer, metadata: dict, overwrite: bool = False) -> Path:
    """Write `model` (a Llama whose Dense layers may be QuantDense) to the directory `path`.

    `metadata` (JSON-serialisable: quantization/calibration settings, source model, report)
    is stored under "run". Returns the final path.
    """
    if tokenizer is None or not hasattr(tokenizer, "_tok"):
        raise TypeError(f"save_quantized: tokenizer must be the model's Tokenizer (e.g. "
                        f"load_model(...).tokenizer), got {type(tokenizer).__name__}")
    if not isinstance(metadata, dict):
        raise TypeError(f"save_quantized: metadata must be a dict, got {type(metadata).__name__}")
    # In a multi-process run (jax.distributed) the arrays are global and orbax writes them
    # collectively into one directory (a shared filesystem); the first process alone does
    # the rest (checks, tokenizer, metadata, the final rename), the others wait for it.
    primary = distributed.is_primary()
    final = Path(path).absolute()
    error = None
    if primary:
        try:
            final = check_output(path, overwrite=overwrite)  # clears a killed run's debris
        except BaseException as e:  # noqa: BLE001 - the others learn of it below
            error = e
    if jax.process_count() > 1:
        failed = distributed.broadcast_flag(error is not None)
        if failed:
            if error is not None:
                raise error
            raise outputs.OutputError(f"{final}: the first process refused the output "
                                      "directory (its message says why)")
    elif error is not None:
        raise error
    tmp = outputs.sibling(final, "partial", pid=distributed.primary_pid())
    if primary:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    distributed.barrier("any4-save-start")
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(tmp / "state", _global_state(_canonical_state(model)))
        ckptr.wait_until_finished()
        distributed.barrier("any4-save-arrays")
        if not primary:
            ckptr.close()
            distributed.barrier("any4-save-done")
            return final
        tok_info = _save_tokenizer(tokenizer, tmp / "tokenizer")
        meta = {
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
            "model_config": model.config.to_dict(),
            "param_dtype": str(model.dtype),
            "quantized_layers": quantized_layer_meta(model),
            "tokenizer": tok_info,
            "run": metadata,
            # every file's sha256, so a damaged array file is named when it is loaded
            "files": outputs.file_digests(tmp, skip=(META_FILE,)),
        }
        meta["checksum"] = outputs.json_checksum(meta)  # detects a hand-edited any4.json
        with open(tmp / META_FILE, "w") as fh:  # last: marks the directory complete
            json.dump(meta, fh, indent=2, default=str)
        outputs.install_dir(tmp, final, overwrite=overwrite, is_ours=is_quantized_checkpoint)
        distributed.barrier("any4-save-done")
    except BaseException:
        # orbax may still be writing from its own threads: let it finish before removing
        with contextlib.suppress(BaseException):  # the first error is the one to report
            ckptr.wait_until_finished()
            ckptr.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ckptr.close()
    return final


def read_metadata(path) -> dict:
    f = os.path.join(path, META_FILE)
    if not os.path.isfile(f):
        raise CheckpointFormatError(
            f"{path}: no {META_FILE}; not an any4-jax checkpoint, or an interrupted save")
    try:
        with open(f) as fh:
            meta = json.load(fh)
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{f}: corrupt metadata ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"{f}: corrupt metadata (not a JSON object)")
    v = meta.get("format_version")
    if v != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path}: checkpoint format_version {v!r} (written by any4-jax "
            f"{meta.get('versions', {}).get('any4-jax', '?')}); this any4-jax reads version "
            f"{FORMAT_VERSION}: re-quantize with this version")
    for key in ("model_config", "quantized_layers", "param_dtype", "tokenizer"):
        if key not in meta:
            raise CheckpointFormatError(f"{f}: metadata lacks {key!r}")
    if "checksum" in meta and meta["checksum"] != outputs.json_checksum(meta):
        raise CheckpointFormatError(
            f"{f} was edited or damaged after it was written (its checksum does not match its "
            "contents); restore the file or re-quantize")
    for sub in ("state", "tokenizer"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise CheckpointFormatError(f"{path}: the {sub}/ directory is missing")
    return meta


def abstract_quantized_model(config, param_dtype, layers: dict[str, dict]):
    """The model structure of a checkpoint, with shapes only (no memory)."""
    def build():
        m = Llama(config, param_dtype=jnp.dtype(param_dtype), rngs=nnx.Rngs(0))
        for p, meta in layers.items():
            set_layer(m, p, QuantDense.placeholder(meta))
        return m

    return nnx.eval_shape(build)


def load_quantized(path, *, mesh=None):
    """(model, config, tokenizer, metadata) from a checkpoint directory.

    mesh: a 1-D mesh with axis "tp" (`nn.sharding.tp_mesh()`): the model comes back tensor
    parallel (`nn.sharding.shard_model`'s layout), each process reading from the files only
    the shards its devices hold; None: every array on this process's first device."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"load_quantized: path must be a checkpoint directory (str or a path), "
                        f"got {type(path).__name__}")
    path = os.path.abspath(path)
    meta = read_metadata(path)
    damaged = outputs.verify_digests(Path(path), meta.get("files", {}))
    if damaged:
        raise CheckpointFormatError(
            f"{path}: {len(damaged)} file(s) of the checkpoint are not as written: "
            + "; ".join(damaged[:5]) + ". Restore them from a copy or re-quantize")
    try:
        config = LlamaConfig.from_dict(meta["model_config"])
        abstract = abstract_quantized_model(config, meta["param_dtype"],
                                            meta["quantized_layers"])
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointFormatError(f"{path}: inconsistent metadata: {e}") from None
    if mesh is not None:
        plan_model(abstract, mesh)
        shardings = target_shardings(abstract, mesh)
    graphdef, state = nnx.split(abstract)
    # whatever topology wrote it (a multi-process run saves global arrays sharded over its
    # processes): onto the mesh as planned, or this process's first device
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    pure = nnx.to_pure_dict(state)
    if mesh is None:
        shardings = jax.tree.map(lambda _: dev, pure)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          pure, shardings)
    ckptr = ocp.StandardCheckpointer()
    state_dir = os.path.join(path, "state")
    try:
        stored = _flat_shapes(ckptr.metadata(state_dir).item_metadata.tree)
    except Exception as e:  # noqa: BLE001
        raise CheckpointFormatError(f"{state_dir}: unreadable orbax metadata ({e})") from None
    want = _flat_shapes(target)
    diff = [f"{k}: stored {stored.get(k)}, any4.json implies {v}" for k, v in want.items()
            if stored.get(k) != v]
    diff += [f"{k}: stored but not in any4.json" for k in stored if k not in want]
    if diff:
        raise CheckpointFormatError(
            f"{path}: the stored arrays do not match any4.json ({len(diff)} differ): "
            + "; ".join(diff[:5]))
    try:
        restored = ckptr.restore(state_dir, target)
    except Exception as e:  # noqa: BLE001 - orbax raises many types for bad files
        first = (str(e).strip().splitlines() or [""])[0][:200]  # not TensorStore's whole dump
        raise CheckpointFormatError(
            f"{path}/state: could not restore the arrays ({type(e).__name__}: {first}); the "
            "checkpoint is corrupt or does not match any4.json") from None
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)
    tok = _load_tokenizer(os.path.join(path, "tokenizer"), meta["tokenizer"])
    return model, config, tok, meta


def _flat_shapes(tree) -> dict[str, tuple]:
    """{"layers/0/mlp/up_proj/codes": (shape, dtype)} for arrays or orbax ArrayMetadata."""
    out = {}
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
    for kp, leaf in leaves:
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)
        out[key] = (tuple(int(d) for d in leaf.shape), str(jnp.dtype(leaf.dtype)))
    return out


def directory_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
