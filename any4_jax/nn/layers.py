"""Finding and replacing the Dense-like layers of an NNX model by dotted path.

A Dense-like layer is a module with a 2-D `kernel` Param (the models' `Dense`), a 3-D one
(stacked experts, `ExpertDense`: [E, in, out]) or a `QuantDense` (`QuantExpertDense` too);
its path is the dotted attribute path, e.g. `layers.3.self_attn.q_proj`.
"""

from __future__ import annotations

from flax import nnx

from any4_jax.nn.qdense import QuantDense


def is_dense(node) -> bool:
    if isinstance(node, QuantDense):
        return True
    k = getattr(node, "kernel", None)
    return (isinstance(node, nnx.Module) and isinstance(k, nnx.Param)
            and k.get_value().ndim in (2, 3))


def num_experts(layer) -> int:
    """Experts stacked in a Dense-like layer: 0 for a plain one."""
    if isinstance(layer, QuantDense):
        return getattr(layer, "num_experts", 0)
    shape = layer.kernel.get_value().shape
    return shape[0] if len(shape) == 3 else 0


def weight_rows(layer):
    """A dense Dense-like layer's weight as the [rows, K] matrix a quantizer takes: the
    kernel transposed, stacked experts' rows one after another ([E*N, K])."""
    w = layer.kernel[...]
    if w.ndim == 2:
        return w.T
    return w.transpose(0, 2, 1).reshape(-1, w.shape[1])


def dense_layers(module) -> list[tuple[str, nnx.Module]]:
    """(dotted path, layer) of every Dense-like layer (a 2-D `kernel` Param, or a QuantDense)."""
    out = []
    for path, node in nnx.iter_graph(module):
        if path and is_dense(node):
            out.append((".".join(str(p) for p in path), node))
    return out


def _child(node, part: str, path: str, module):
    try:
        return node[int(part)] if part.isdigit() else getattr(node, part)
    except (AttributeError, IndexError, KeyError, TypeError):
        raise ValueError(f"no layer {path!r} in this {type(module).__name__}: "
                         f"{type(node).__name__} has no {part!r}") from None


def _parent(module, path: str):
    parts = path.split(".")
    node = module
    for p in parts[:-1]:
        node = _child(node, p, path, module)
    return node, parts[-1]


def get_layer(module, path: str):
    """The layer at a dotted path; a ValueError naming the path if there is none."""
    parent, last = _parent(module, path)
    return _child(parent, last, path, module)


def set_layer(module, path: str, layer) -> None:
    parent, last = _parent(module, path)
    if last.isdigit():
        parent[int(last)] = layer
    else:
        setattr(parent, last, layer)
