"""Llama-family decoders (Llama 2/3, Mistral, SmolLM2): config presets, NNX modules, loaders
for Hugging Face safetensors / Flax msgpack and GGUF, tokenizers, KV-cache generation."""
