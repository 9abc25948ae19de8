"""The model stack's bottom: the Llama family in Flax NNX, its loaders and generation.

Knows nothing of quantization: a quantizer swaps the one `Dense` class for its own layer.
"""
