"""Tokenizers, Megatron-format indexed datasets, sample packing, samplers and the default corpus."""
