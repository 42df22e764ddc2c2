"""The model: a Llama-style decoder-only transformer, its KV cache and its FLOP accounting."""

from distllm.model.flops import count_params, flops_per_token, mfu, peak_flops
from distllm.model.transformer import KVCache, Transformer

__all__ = ["Transformer", "KVCache", "flops_per_token", "count_params", "mfu", "peak_flops"]
