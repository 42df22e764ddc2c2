"""The model's own config: the shape of a Llama-style transformer (``model:`` in a run file).

It lives with the model so that model code never imports the run configuration (``distllm.config``
imports it from here, never the other way round).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    """Embedding rows; must be >= the tokenizer's vocabulary (pad up to a multiple of 64)."""
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention (None = n_heads, i.e. multi-head)."""
    d_model: int = 384
    ffn_hidden: Optional[int] = None
    """SwiGLU hidden width (None = 8/3 * d_model rounded up to ``multiple_of``)."""
    multiple_of: int = 64
    max_seq_len: int = 1024
    """Longest sequence the model accepts (RoPE tables are built up to this length)."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output projection."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections use init_std / sqrt(2 * n_layers)."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(8 * self.d_model / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


