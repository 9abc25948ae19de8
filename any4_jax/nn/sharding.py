"""Tensor parallelism for quantized models (docs/distributed.md s.Sharded evaluation).

`shard_model(model, mesh)` places a model's arrays over a 1-D mesh axis: q/k/v/gate/up
`QuantDense`s split along N (column parallel: each device computes its output features),
o/down along K on group boundaries (row parallel: each device its slice of the input
features, the partial sums reduced), everything else replicated. Each sharded layer then runs
its `lut_matmul` per shard inside `shard_map` (so a kernel sees an ordinary [N/tp, K] or
[N, K/tp] weight), and jit partitions the rest of the model around it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from any4_jax.kernels.api import lut_matmul
from any4_jax.nn.layers import dense_layers
from any4_jax.nn.qdense import QuantDense
from any4_jax.quant.qweight import QuantizedWeight

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """How one QuantDense is split: kind "column" (N) or "row" (K) over `axis` of `mesh`."""

    kind: str
    mesh: Mesh
    axis: str = "tp"

    @property
    def size(self) -> int:
        return self.mesh.shape[self.axis]

    def specs(self) -> dict[str, PartitionSpec]:
        """The spec of each of codes, lut, scales, zeros: column parallel splits every one
        along N; row parallel splits codes, scales and zeros along K (on group boundaries)
        and keeps each row's table whole."""
        if self.kind == "column":
            return dict.fromkeys(QuantizedWeight._DATA, PartitionSpec(self.axis))
        along_k = PartitionSpec(None, self.axis)
        return {"codes": along_k, "lut": PartitionSpec(), "scales": along_k, "zeros": along_k}


def tp_mesh(devices=None, axis: str = "tp") -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    return Mesh(np.array(devices if devices is not None else jax.devices()), (axis,))


def _put(a, sharding: NamedSharding):
    """`a` (the same value in every process) placed as `sharding` says. Across processes it
    goes through host memory: each process places its own shards (no cross-host transfer)."""
    if jax.process_count() > 1:
        return jax.device_put(np.asarray(a), sharding)
    return jax.device_put(a, sharding)


def _plan(layer: QuantDense, name: str, tp: int) -> str | None:
    n, k = layer.meta.shape
    if layer.layout != "canonical" or type(layer) is not QuantDense:
        return None
    if name in COLUMN and n % tp == 0:
        return "column"
    if name in ROW and k % (layer.group_size * tp) == 0 and (k // 2) % tp == 0:
        return "row"
    return None


def plan_model(model, mesh: Mesh, *, axis: str = "tp") -> dict[str, str]:
    """Decides, in place, how each QuantDense of `model` is split (its `tp`), without moving
    any array (an abstract model works: what `target_shardings` and a sharded restore use);
    returns {layer path: "column" | "row" | "replicated"}."""
    if axis not in mesh.axis_names:
        raise ValueError(f"shard_model: the mesh has axes {mesh.axis_names}, not {axis!r}")
    out = {}
    for path, layer in dense_layers(model):
        if isinstance(layer, QuantDense):
            kind = _plan(layer, path.split(".")[-1], mesh.shape[axis])
            layer.tp = None if kind is None else TensorParallel(kind, mesh, axis)
            out[path] = kind or "replicated"
    return out


def target_shardings(model, mesh: Mesh):
    """The NamedSharding of every array of a planned `model` (`plan_model`), as the pure dict
    `nnx.to_pure_dict` gives: the split layers' arrays by their specs, the rest replicated."""
    rep = NamedSharding(mesh, PartitionSpec())
    split = {}
    for path, layer in dense_layers(model):
        tp = getattr(layer, "tp", None)
        if isinstance(layer, QuantDense) and tp is not None:
            for f, spec in tp.specs().items():
                split[(*_keys(path), f)] = NamedSharding(mesh, spec)
    _, state = nnx.split(model)
    out: dict = {}
    for p, _ in nnx.to_flat_state(state):
        d = out
        for k in p[:-1]:
            d = d.setdefault(k, {})
        d[p[-1]] = split.get(tuple(p), rep)
    return out


def _keys(path: str) -> tuple:
    return tuple(int(k) if k.isdigit() else k for k in path.split("."))


def shard_model(model, mesh: Mesh | None = None, *, axis: str = "tp") -> dict[str, str]:
    """Places `model`'s arrays over `mesh` (default `tp_mesh()`), in place; returns
    {layer path: "column" | "row" | "replicated"}. A layer whose N (column) or K (row, on
    group boundaries) the axis does not divide stays replicated."""
    mesh = mesh or tp_mesh(axis=axis)
    out = plan_model(model, mesh, axis=axis)
    _, state = nnx.split(model)
    placed = jax.tree.map(_put, nnx.to_pure_dict(state), target_shardings(model, mesh))
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(model, state)
    return out


def tp_matmul(x, weight: QuantizedWeight, tp: TensorParallel, implementation: str | None):
    """x [..., K] @ the sharded weight, each shard's `lut_matmul` inside shard_map: column
    parallel -> y [..., N] split along N; row parallel -> the shards' partial sums over K
    (float32) reduced, y replicated."""
    n, k = weight.shape
    lead = (None,) * (x.ndim - 1)
    local_shape = (n // tp.size, k) if tp.kind == "column" else (n, k // tp.size)
    meta = dataclasses.replace(weight.meta, shape=local_shape)
    ws = tp.specs()

    def one(xs, codes, lut, scales, zeros):
        w = QuantizedWeight.from_meta(meta, codes=codes, lut=lut, scales=scales, zeros=zeros)
        if tp.kind == "column":
            return lut_matmul(xs, w, implementation=implementation)
        # partial sums in float32 whatever x's dtype, reduced once
        y = lut_matmul(xs.astype(jnp.float32), w, implementation=implementation)
        return jax.lax.psum(y, tp.axis).astype(xs.dtype)

    xspec = PartitionSpec(*lead, None) if tp.kind == "column" else PartitionSpec(*lead, tp.axis)
    yspec = PartitionSpec(*lead, tp.axis) if tp.kind == "column" else PartitionSpec(*lead, None)
    f = jax.shard_map(one, mesh=tp.mesh,
                      in_specs=(xspec, *(ws[f] for f in QuantizedWeight._DATA)),
                      out_specs=yspec, check_vma=False)
    return f(x, weight.codes, weight.lut, weight.scales, weight.zeros)
