"""Build a `Llama` from named arrays: the common last step of every loader.

Paths are tuples like ("layers", 3, "self_attn", "q_proj", "kernel"); Dense kernels are
[in, out] (Flax layout). Loaders convert one tensor at a time, so at most one tensor beyond
the model is alive during loading.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from any4_jax.models.llama.config import LlamaConfig
from any4_jax.models.llama.modules import Llama
from any4_jax.models.llama.safetensors_io import CheckpointError

Path = tuple


def abstract_model(config: LlamaConfig, param_dtype=jnp.float32) -> Llama:
    """The model with ShapeDtypeStruct leaves: costs no memory."""
    return nnx.eval_shape(lambda: Llama(config, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def path_str(path: Path) -> str:
    return ".".join(str(p) for p in path)


def assemble(config: LlamaConfig, tensors: Iterable[tuple[Path, np.ndarray]], *,
             param_dtype, source: str, convert: Callable | None = None,
             model: Llama | None = None) -> Llama:
    """Fill a model from (path, array) pairs; checks names and shapes, names what is wrong.

    `convert(path, array) -> array` runs per tensor (e.g. transpose); arrays are moved to the
    default device in `param_dtype` one at a time. `model`: an abstract model (from
    `abstract_model`) in which some layers already hold real arrays (e.g. QuantDense); those
    are kept as they are.
    """
    graphdef, state = nnx.split(model if model is not None
                                else abstract_model(config, param_dtype))
    flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
    want = {p: v for p, v in flat.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)}
    got: dict[Path, jax.Array] = {}
    for path, arr in tensors:
        if path not in want:
            continue
        if convert is not None:
            arr = convert(path, arr)
        shape = tuple(want[path].shape)
        if tuple(arr.shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {path_str(path)} has shape {tuple(arr.shape)}, the config "
                f"({config.name}: hidden {config.hidden_size}, heads {config.num_heads}/"
                f"{config.num_kv_heads}, mlp {config.intermediate_size}, vocab "
                f"{config.vocab_size}) needs {shape}; config.json and the weights disagree")
        x = jnp.asarray(np.asarray(arr), dtype=param_dtype)
        if not bool(jnp.isfinite(x).all()):
            raise CheckpointError(f"{source}: tensor {path_str(path)} holds NaN or Inf values; "
                                  "the file is corrupt")
        got[path] = x
    missing = [path_str(p) for p in want if p not in got]
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} tensors missing, e.g. {missing[:4]}; the checkpoint is "
            "incomplete or not a Llama-family model")
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
