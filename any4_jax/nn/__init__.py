"""The quantized layers (`QuantDense`, `BCQDense` for LO-BCQ) and the model-tree helpers:
`dense_layers`, `get_layer`/`set_layer`, `prepare_model`."""

from any4_jax.nn.bcqdense import BCQDense
from any4_jax.nn.layers import dense_layers, get_layer, is_dense, set_layer
from any4_jax.nn.prepare import prepare_model
from any4_jax.nn.qdense import QuantDense, QuantState

__all__ = ["BCQDense", "QuantDense", "QuantState", "dense_layers", "get_layer", "is_dense",
           "prepare_model", "set_layer"]
