"""The model: a Llama-style decoder-only transformer, its config, KV cache and FLOP accounting.

Names are imported on first use, so ``distllm.model.config`` (needed by ``distllm.config``) loads
without torch.
"""

from distllm.model.config import ModelConfig

__all__ = ["ModelConfig", "Transformer", "KVCache", "flops_per_token", "count_params", "mfu", "peak_flops"]

_LAZY = {
    "Transformer": "distllm.model.transformer",
    "KVCache": "distllm.model.transformer",
    "flops_per_token": "distllm.model.flops",
    "count_params": "distllm.model.flops",
    "mfu": "distllm.model.flops",
    "peak_flops": "distllm.model.flops",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distllm.model' has no attribute {name!r}")
