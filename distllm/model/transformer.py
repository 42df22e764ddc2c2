"""Decoder-only transformer in the Llama style. Single-device code: parallelism wraps it from outside.

    tokens (B, T) -> tok_emb -> n_layers x Block -> norm -> lm_head -> logits (B, T, vocab_size)
                                                          or, given labels, the summed cross-entropy
    Block:   x = x + attn(attn_norm(x))
             x = x + mlp(mlp_norm(x))
    attn:    causal self-attention with rotary position embedding and grouped-query attention
    mlp:     SwiGLU, w_down(silu(gate) * up)

No biases anywhere. Q/K/V and gate/up are each one fused Linear (fewer, larger matmuls). The
measured fast paths (hand-written backwards for RoPE, SwiGLU and RMSNorm, how grouped-query k/v
reach SDPA, FlexAttention for packed documents on CUDA) live in ``kernels.py``, the chunked
cross-entropy fused with the output projection in ``fused_loss.py``; this file is the math.

    model(input_ids)                          -> logits (B, T, vocab_size) in the compute dtype
    model(input_ids, labels=labels)           -> fp32 scalar: the SUM of the token cross-entropies over
                                                 positions with labels != -100 (labels (B, T) are the
                                                 targets of each position, already shifted); the
                                                 (B*T, vocab) logits never exist at once
    model(input_ids, doc_ids=doc_ids, ...)    -> attention stays inside each packed document
                                                 (doc_ids (B, T): the document of each token)

The loss is computed inside the output head module (``OutputHead``), so DeepSpeed ZeRO-3's module
hooks gather its weight (the embedding's, when tied) around it.

Parameter names and shapes (hd = head_dim, nh = n_heads, nkv = kv_heads, h = hidden_dim), with the
Hugging Face ``LlamaForCausalLM`` tensor each one maps to; the fused weights are stacked along dim 0,
so the export is a plain split (no permutation, RoPE already uses HF's "rotate_half" convention):

    tok_emb.weight                   (vocab, d)            model.embed_tokens.weight
    layers.{i}.attn_norm.weight      (d,)                  model.layers.{i}.input_layernorm.weight
    layers.{i}.attn.wqkv.weight      ((nh + 2 nkv) hd, d)  [q_proj; k_proj; v_proj]
    layers.{i}.attn.wo.weight        (d, nh hd)            o_proj
    layers.{i}.mlp_norm.weight       (d,)                  model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.mlp.w_gate_up.weight  (2 h, d)              [gate_proj; up_proj]
    layers.{i}.mlp.w_down.weight     (d, h)                down_proj
    norm.weight                      (d,)                  model.norm.weight
    lm_head.weight                   (vocab, d)            lm_head.weight (the same tensor as tok_emb.weight when tied)

Initialisation: every matrix (embedding, wqkv, w_gate_up, untied lm_head) ~ normal(0, init_std);
the residual output projections ``attn.wo`` and ``mlp.w_down`` ~ normal(0, init_std / sqrt(2 *
n_layers)) (GPT-2 scaling: the residual stream receives 2 * n_layers contributions); RMSNorm
weights = 1. Each module initialises its own parameters in its own constructor (``Linear``,
``Embedding`` and ``RMSNorm`` below), drawing from torch's global RNG in module order, so:

* the same seed gives the same weights on every rank, with no broadcast;
* DeepSpeed ZeRO-3 ``deepspeed.zero.Init``, which partitions a module's parameters as soon as its
  constructor returns, sees every parameter already initialised (a pass at the end of
  ``Transformer.__init__`` would write into empty placeholders).

The RoPE tables are fp32 buffers under every engine: built without floating constructors (which
``zero.Init`` casts to bf16), rebuilt after ``.to()``/``.bfloat16()``, and rebuilt when read if
something replaced their ``.data`` in another dtype (DeepSpeed's ``buffer_dtype`` does).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from distllm.model.config import ModelConfig
from distllm.model import kernels
from distllm.model.fused_loss import linear_cross_entropy
from distllm.model.kernels import attention, qkv_rope, rms_norm, rope_tables, swiglu


class Linear(nn.Linear):
    """Bias-free ``nn.Linear`` whose weight (out, in) ~ normal(0, std), drawn in its own constructor.
    ``std=None`` leaves the weight uninitialised (and draws nothing): for a weight that is replaced,
    e.g. the tied output projection."""

    def __init__(self, in_features: int, out_features: int, std: float | None):
        self.std = std  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        if self.std is not None:
            nn.init.normal_(self.weight, 0.0, self.std)


class Embedding(nn.Embedding):
    """``nn.Embedding`` whose table (num, dim) ~ normal(0, std), drawn in its own constructor."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float):
        self.std = std
        super().__init__(num_embeddings, embedding_dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, self.std)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # x / sqrt(mean(x^2) + eps) * weight


class OutputHead(Linear):
    """The output projection ``lm_head``: hidden states (B, T, d) -> logits (B, T, vocab), or with
    ``labels`` (B, T) the fp32 sum of the token cross-entropies (``fused_loss.linear_cross_entropy``:
    chunks of ``chunk_tokens`` tokens, None = automatic). A module of its own so that ZeRO-3 gathers
    ``weight`` around the whole loss computation."""

    chunk_tokens: int | None = None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, loss_fn=None) -> torch.Tensor:
        if labels is None:
            return super().forward(x)  # (B, T, vocab)
        if loss_fn is not None:  # another loss fused with this projection, e.g. distill.linear_distill_loss
            return loss_fn(x.flatten(0, -2), self.weight, labels.flatten())
        return linear_cross_entropy(x.flatten(0, -2), self.weight, labels.flatten(), self.chunk_tokens)


class RotaryEmbedding(nn.Module):
    """RoPE tables ``cos``, ``sin`` (max_seq_len, head_dim) of ``rope_tables``: fp32, non-persistent buffers."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = rope_tables(head_dim, max_seq_len, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would round the tables and model.to_empty() (meta-device init)
        # would leave them uninitialised: after any such move, rebuild them in fp32 on the new device.
        super()._apply(fn, recurse)
        self.cos, self.sin = rope_tables(self.head_dim, self.max_seq_len, self.theta, device=self.cos.device)
        return self

    def tables(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows of positions [start, end): (end - start, head_dim) fp32. Tables whose ``.data``
        was replaced in another dtype (bypassing ``_apply``, as DeepSpeed's ``buffer_dtype`` cast does)
        are rebuilt first."""
        if self.cos.dtype != torch.float32 or self.sin.dtype != torch.float32:
            self.cos, self.sin = rope_tables(self.head_dim, self.max_seq_len, self.theta, device=self.cos.device)
        return self.cos[start:end], self.sin[start:end]


class KVCache:
    """Preallocated keys and values for incremental decoding.

    ``k[i]``, ``v[i]``: (batch_size, n_kv_heads, max_len, head_dim) for layer i. A forward with
    ``start_pos`` writes the new positions [start_pos, start_pos + T) and attends over [0, start_pos + T).
    Batches smaller than ``batch_size`` use the first rows.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None, device=None, dtype=None):
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KV cache length {max_len} exceeds max_seq_len {cfg.max_seq_len}")
        self.batch_size, self.max_len = batch_size, max_len
        shape = (batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) at [start_pos, start_pos + T); return keys, values (B, nkv, start_pos + T, hd)."""
        B, _, T, _ = k.shape
        end = start_pos + T
        self.k[layer][:B, :, start_pos:end] = k
        self.v[layer][:B, :, start_pos:end] = v
        return self.k[layer][:B, :, :end], self.v[layer][:B, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.wqkv = Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, cfg.init_std)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, out_std)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0,
        attn_mask=None,
    ) -> torch.Tensor:
        """``attn_mask``: None (causal), or what ``kernels.document_mask`` builds (a dense (B, 1, T, T)
        bool mask or a FlexAttention BlockMask) to keep attention inside packed documents."""
        B, T, _ = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(B, T, nh + 2 * nkv, hd)  # heads [q..., k..., v...]
        q, k, v = qkv_rope(qkv, cos, sin, nh, nkv)  # q, k rotated; (B, T, nh | nkv | nkv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is None and attn_mask is not None:  # causal within each packed document
            y = kernels.attention_in_documents(q, k, v, attn_mask)  # (B, nh, T, hd)
        elif cache is None:
            y = attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        else:
            k, v = cache.update(self.layer_id, k, v, start_pos)  # (B, nkv, S, hd), S = start_pos + T
            if start_pos == 0 or T == 1:  # a fresh prompt (causal) or one new token (sees every key)
                y = attention(q, k, v, is_causal=T > 1)  # (B, nh, T, hd)
            else:  # query i sits at position start_pos + i and sees keys 0 .. start_pos + i
                mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos)  # (T, S)
                y = attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)  # (B, T, d)
        return self.wo(y)  # (B, T, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.w_gate_up = Linear(cfg.d_model, 2 * cfg.hidden_dim, cfg.init_std)
        self.w_down = Linear(cfg.hidden_dim, cfg.d_model, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w_gate_up(x)  # (B, T, 2h): [gate, up]
        return self.w_down(swiglu(gate_up))  # silu(gate) * up: (B, T, h) -> (B, T, d)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_id)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0,
        attn_mask=None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start_pos, attn_mask)  # (B, T, d)
        return x + self.mlp(self.mlp_norm(x))  # (B, T, d)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads or cfg.head_dim % 2 or cfg.n_heads % cfg.kv_heads:
            raise ValueError(
                f"need d_model % n_heads == 0, an even head_dim and n_heads % n_kv_heads == 0; got d_model="
                f"{cfg.d_model}, n_heads={cfg.n_heads}, n_kv_heads={cfg.kv_heads}"
            )
        self.cfg = cfg
        self.activation_checkpointing = False  # recompute each block's activations in backward (training only)
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model, cfg.init_std)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = OutputHead(cfg.d_model, cfg.vocab_size, None if cfg.tie_embeddings else cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """Empty cache for this model, on its device and in its parameter dtype unless given."""
        weight = self.tok_emb.weight
        return KVCache(self.cfg, batch_size, max_len, device=device or weight.device, dtype=dtype or weight.dtype)

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                *, cache: KVCache | None = None, start_pos: int = 0, attn_mask: torch.Tensor | None = None,
                head_loss=None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab_size); with ``labels`` (B, T) int64 (the target of each
        position, -100 = not counted) -> the fp32 SUM of the counted tokens' cross-entropies, computed
        in chunks inside ``lm_head`` (no (B*T, vocab) logits).

        ``doc_ids`` (B, T): the packed document of each token; attention stays inside documents
        (FlexAttention on CUDA, a dense mask elsewhere: ``kernels.document_mask``). With a ``cache``,
        tokens sit at positions start_pos.. (inference; no doc_ids). ``attn_mask`` (B, 1, T, T) bool
        (True = may attend) replaces the causal mask (the dense form of doc_ids, kept for callers that
        build it themselves). ``head_loss(hidden (B*T, d), lm_head weight (V, d), labels (B*T,))`` replaces the
        cross-entropy by another summed loss computed inside ``lm_head`` (so ZeRO-3 gathers its weight around
        it), e.g. distillation's, without the (B*T, vocab) logits."""
        B, T = tokens.shape
        end = start_pos + T
        if end > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {end} positions (start_pos {start_pos} + {T} tokens) exceeds "
                f"max_seq_len {self.cfg.max_seq_len}"
            )
        if cache is not None and (end > cache.max_len or B > cache.batch_size):
            raise ValueError(
                f"KV cache holds {cache.batch_size} x {cache.max_len} positions, got batch {B} up to position {end}"
            )
        if doc_ids is not None:
            if cache is not None or attn_mask is not None:
                raise ValueError("doc_ids cannot be combined with a KV cache or an explicit attn_mask")
            attn_mask = kernels.document_mask(doc_ids)  # built once, shared by every layer
        x = self.tok_emb(tokens)  # (B, T, d)
        cos, sin = self.rope.tables(start_pos, end)  # (T, hd) fp32
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, cache, start_pos, attn_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, start_pos, attn_mask)  # (B, T, d)
        if labels is None:
            return self.lm_head(self.norm(x))  # (B, T, vocab_size)
        return self.lm_head(self.norm(x), labels, head_loss)  # fp32 scalar: summed cross-entropy (or head_loss)
