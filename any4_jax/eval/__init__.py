"""Evaluation: perplexity in a jitted loop, text sources, and per-layer error analysis."""
