"""Build a `Llama` from named arrays: the common last step of every loader.

Paths are tuples like ("layers", 3, "self_attn", "q_proj", "kernel"); Dense kernels are
[in, out] (Flax layout). Loaders convert one tensor at a time, so at most one tensor beyond
the model is alive during loading.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from any4_jax.models.llama.config import LlamaConfig
from any4_jax.models.llama.modules import Llama
from any4_jax.models.llama.safetensors_io import REDOWNLOAD, CheckpointError

Path = tuple


def abstract_model(config: LlamaConfig, param_dtype=jnp.float32) -> Llama:
    """The model with ShapeDtypeStruct leaves: costs no memory."""
    return nnx.eval_shape(lambda: Llama(config, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def path_str(path: Path) -> str:
    return ".".join(str(p) for p in path)


class TensorInfo(NamedTuple):
    """What a loader knows of one stored tensor before reading it: the name in the file, our
    path (None: a name no rule maps), and, where known, the shape in our layout and the dtype
    (None: checked later, when the tensor is read)."""

    name: str
    path: Path | None
    shape: tuple | None = None
    dtype: object = None


def _describe(config: LlamaConfig) -> str:
    return (f"{config.name}: {config.num_layers} layers, hidden {config.hidden_size}, heads "
            f"{config.num_heads}/{config.num_kv_heads}, mlp {config.intermediate_size}, vocab "
            f"{config.vocab_size}")


def _few(names: list[str]) -> str:
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    return f"{len(names)} tensor{'s' * (len(names) != 1)} ({', '.join(names[:4])}{more})"


def _shape_error(config, source, path, got, want) -> CheckpointError:
    return CheckpointError(
        f"{source}: tensor {path_str(path)} has shape {tuple(got)}, the config "
        f"({_describe(config)}) needs {tuple(want)}; the config and the weights disagree")


def _dtype_error(source, name, dtype) -> CheckpointError:
    return CheckpointError(
        f"{source}: tensor {name} has dtype {dtype}; weights must be floating point (float32, "
        "float16, bfloat16): this is not a float checkpoint (e.g. an integer-quantized "
        "export), load the original float weights instead")


def is_float(dtype) -> bool:
    # jnp's issubdtype knows ml_dtypes (bfloat16 is floating); numpy's does not
    return jnp.issubdtype(dtype, jnp.floating)


def expected_shapes(model: Llama) -> dict[Path, tuple]:
    """{path: shape} of the leaves of `model` still to be loaded (ShapeDtypeStruct leaves)."""
    _, state = nnx.split(model)
    return {tuple(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)
            if isinstance(v.get_value(), jax.ShapeDtypeStruct)}


def check_tensors(config: LlamaConfig, infos: Iterable[TensorInfo], *, source: str,
                  model: Llama | None = None, complete: bool = True) -> None:
    """Check names, dtypes and shapes from what a file's header says, before any tensor is
    converted; raises a CheckpointError that names the tensors.

    Tensors the config does not account for (an extra layer, an unknown name) are an error,
    not silently dropped: loaders leave out only what they know to be ignorable. `complete`:
    `infos` lists every tensor of the checkpoint, so missing ones are reported too.
    """
    want = expected_shapes(model if model is not None else abstract_model(config))
    unknown, seen = [], {}
    for info in infos:
        if info.path is None or info.path not in want:
            unknown.append(info.name)
        elif info.path in seen:
            raise CheckpointError(f"{source}: tensors {seen[info.path]} and {info.name} both "
                                  f"hold {path_str(info.path)}; {REDOWNLOAD}")
        else:
            seen[info.path] = info.name
            if info.dtype is not None and not is_float(info.dtype):
                raise _dtype_error(source, info.name, info.dtype)
            if info.shape is not None and tuple(info.shape) != want[info.path]:
                raise _shape_error(config, source, info.path, info.shape, want[info.path])
    if unknown:
        raise CheckpointError(
            f"{source}: holds {_few(unknown)} that the config ({_describe(config)}) does not "
            "account for; the config and the weights disagree (e.g. the number of layers) or "
            "this is not a plain Llama/Mistral checkpoint: fix the config or remove those "
            "tensors")
    missing = [path_str(p) for p in want if p not in seen]
    if complete and missing:
        raise _missing_error(source, missing)


def _missing_error(source, missing) -> CheckpointError:
    return CheckpointError(
        f"{source}: {len(missing)} tensors missing, e.g. {missing[:4]}; the checkpoint is "
        "incomplete or not a Llama-family model")


def assemble(config: LlamaConfig, tensors: Iterable[tuple[Path, np.ndarray]], *,
             param_dtype, source: str, convert: Callable | None = None,
             model: Llama | None = None) -> Llama:
    """Fill a model from (path, array) pairs; checks names, dtypes and shapes, names what is
    wrong (loaders run `check_tensors` on the file headers first, so that these checks fail
    before any work; here they guard what the headers could not tell).

    `convert(path, array) -> array` runs per tensor (e.g. transpose); arrays are moved to the
    default device in `param_dtype` one at a time. `model`: an abstract model (from
    `abstract_model`) in which some layers may already hold real arrays (e.g. QuantDense);
    those are kept as they are.
    """
    graphdef, state = nnx.split(model if model is not None
                                else abstract_model(config, param_dtype))
    flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
    want = {p: v for p, v in flat.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)}
    got: dict[Path, jax.Array] = {}
    for path, arr in tensors:
        if path not in want:
            raise CheckpointError(
                f"{source}: tensor {path_str(path)} is not part of the model "
                f"({_describe(config)}); the config and the weights disagree")
        if path in got:
            raise CheckpointError(f"{source}: tensor {path_str(path)} is given twice; "
                                  f"{REDOWNLOAD}")
        if not is_float(arr.dtype):
            raise _dtype_error(source, path_str(path), arr.dtype)
        if convert is not None:
            arr = convert(path, arr)
        shape = tuple(want[path].shape)
        if tuple(arr.shape) != shape:
            raise _shape_error(config, source, path, arr.shape, shape)
        x = jnp.asarray(np.asarray(arr), dtype=param_dtype)
        if not bool(jnp.isfinite(x).all()):
            raise CheckpointError(f"{source}: tensor {path_str(path)} holds NaN or Inf values; "
                                  "the file is corrupt")
        got[path] = x
    missing = [path_str(p) for p in want if p not in got]
    if missing:
        raise _missing_error(source, missing)
    pure: dict = {}
    for path, v in flat.items():
        if path not in want:
            got[path] = v.get_value()
    for path, arr in got.items():
        d = pure
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = arr
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def random_model(config: LlamaConfig, *, seed: int = 0, param_dtype=jnp.float32) -> Llama:
    """A randomly initialised model (tests, benchmarks)."""
    return Llama(config, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
