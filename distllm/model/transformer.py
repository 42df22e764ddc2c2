"""Decoder-only transformer in the Llama style. Single-device code: parallelism wraps it from outside.

    tokens (B, T) -> tok_emb -> n_layers x Block -> norm -> lm_head -> logits (B, T, vocab_size)
    Block:   x = x + attn(attn_norm(x))
             x = x + mlp(mlp_norm(x))
    attn:    causal self-attention with rotary position embedding and grouped-query attention
    mlp:     SwiGLU, w_down(silu(gate) * up)

No biases anywhere. Q/K/V and gate/up are each one fused Linear (fewer, larger matmuls). Three small
autograd Functions replace autograd's op-by-op backward where it wastes passes over memory: RoPE
(the inverse rotation, written with dv straight into the fused qkv gradient), SwiGLU (both gradient
halves written into one fused buffer) and, for CPU training, RMSNorm; tests/model checks each
against plain autograd.

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

Initialisation (``Transformer.init_weights``): every matrix (embedding, wqkv, w_gate_up, untied
lm_head) ~ normal(0, init_std); the residual output projections ``attn.wo`` and ``mlp.w_down``
~ normal(0, init_std / sqrt(2 * n_layers)) (GPT-2 scaling: the residual stream receives 2 * n_layers
contributions); RMSNorm weights = 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distllm.config import ModelConfig

_fused_rms_norm = getattr(torch.ops.aten, "_fused_rms_norm", None)  # one-pass forward kernel of recent torch


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward, for CPU training.

    On CPU torch's rms_norm is a composition of elementwise ops, and autograd differentiates it op
    by op (a dozen passes over x and several saved intermediates). The forward here is torch's
    one-pass ``_fused_rms_norm`` kernel where this torch has it (it has no CPU backward); it saves
    only x and the per-row r = rsqrt(mean(x^2) + eps). With y = x r w, a = dy r and t = a x = dy x_hat:

        dw = sum over rows of t
        dx = r (dy w - x_hat mean(dy w x_hat)) = a w - x r^2 (t . w) / d

    where t . w, a matrix-vector product, gives the row means without another full-size product.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if _fused_rms_norm is not None and x.dtype == weight.dtype == torch.float32:
            y, r = _fused_rms_norm(x, [x.size(-1)], weight, eps)  # r: (..., 1) fp32
        else:
            xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in at least fp32
            r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))  # (..., 1)
            y = (xf * r * weight).type_as(x)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        x_dtype, x, w, dy = x.dtype, x.to(r.dtype), weight.to(r.dtype), dy.to(r.dtype)
        a = dy * r
        t = a * x  # dy x_hat
        dweight = t.flatten(0, -2).sum(0)  # (d,)
        coef = (t @ w).unsqueeze_(-1).mul_(r.square()).div_(x.size(-1))  # (..., 1): r^2 mean(dy w x_hat)
        dx = a.mul_(w).addcmul_(x, coef, value=-1)
        return dx.to(x_dtype), dweight.to(weight.dtype), None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_grad_enabled():
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # fused forward and backward on GPUs

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables (max_seq_len, head_dim) in fp32 for ``apply_rope``: [cos, cos] and [-sin, sin] of
    the angles position * theta^(-2i / head_dim), i < head_dim / 2 (each half of the head uses every frequency)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    pos = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)  # (max_seq_len, hd/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate x (B, T, heads, hd) by position, with cos, sin (T, hd) rows of ``rope_tables``.

    HF Llama "rotate_half" convention: dimension i pairs with i + hd/2 (not with i + 1):
    for the halves x = [x1, x2],

        out = [x1 cos - x2 sin, x2 cos + x1 sin]

    computed half by half straight into ``out`` (new and contiguous unless given; it must not overlap
    x): four passes over half of x, no rotated copy of x. ``inverse`` rotates by the opposite angles.
    The products are taken in the tables' fp32 and stored in out's dtype (x's by default).
    """
    half = x.size(-1) // 2
    c, s = cos[:, None, :half], sin[:, None, half:]  # (T, 1, hd/2): cos and +sin of each frequency
    x1, x2 = x[..., :half], x[..., half:]
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    sign = -1 if inverse else 1
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=o2).addcmul_(x1, s, value=sign)
    return out


class QKVRoPEFunction(torch.autograd.Function):
    """Split the fused projection qkv (B, T, nh + 2 nkv, hd) into rotated queries q (B, T, nh, hd),
    rotated keys k (B, T, nkv, hd) and values v (B, T, nkv, hd). q and k are rotated in one go into a
    new tensor; v is a view of qkv.

    The backward writes the inverse rotations of dq and dk and a copy of dv straight into one
    gradient for qkv, where autograd would build the three apart and then concatenate them.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int):
        ctx.save_for_backward(cos, sin)
        ctx.nh, ctx.nkv, ctx.shape = nh, nkv, qkv.shape
        qk = apply_rope(qkv[:, :, : nh + nkv], cos, sin)
        return qk[:, :, :nh], qk[:, :, nh:], qkv[:, :, nh + nkv :]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):  # unused outputs arrive as zeros
        cos, sin = ctx.saved_tensors
        nh, nkv = ctx.nh, ctx.nkv
        dqkv = dq.new_empty(ctx.shape)
        apply_rope(dq, cos, sin, inverse=True, out=dqkv[:, :, :nh])
        apply_rope(dk, cos, sin, inverse=True, out=dqkv[:, :, nh : nh + nkv])
        dqkv[:, :, nh + nkv :] = dv
        return dqkv, None, None, None, None


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
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(B, T, nh + 2 * nkv, hd)  # heads [q..., k..., v...]
        q, k, v = (t.transpose(1, 2) for t in QKVRoPEFunction.apply(qkv, cos, sin, nh, nkv))  # (B, heads, T, hd)
        # enable_gqa: SDPA shares each kv head among n_heads // n_kv_heads query heads without
        # materialising repeated k/v; measured ~15% faster than repeat_interleave on CPU (fwd + bwd).
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nh)  # (B, nh, T, hd)
        else:
            k, v = cache.update(self.layer_id, k, v, start_pos)  # (B, nkv, S, hd), S = start_pos + T
            # query i sits at position start_pos + i and sees keys 0 .. start_pos + i
            mask = None if T == 1 else torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv != nh)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)  # (B, T, d)
        return self.wo(y)


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up for the fused projection gate_up = [gate, up] (..., 2h) -> (..., h).

    The backward writes both halves of the gradient into the saved gate_up buffer itself, in place,
    where autograd would allocate the two halves apart and then concatenate them for the fused
    w_gate_up: no new (..., 2h) tensor. The buffer is then spent, so backward runs once (autograd's
    version check refuses a second pass).
    """

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        d_act = up.mul_(dy)  # up is not needed again
        torch.ops.aten.silu_backward(d_act, gate, grad_input=gate)  # gate half := d_gate = d_act silu'(gate)
        torch.mul(dy, act, out=up)  # up half := d_up
        return gate_up


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate_up = nn.Linear(cfg.d_model, 2 * cfg.hidden_dim, bias=False)
        self.w_down = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(SwiGLUFunction.apply(self.w_gate_up(x)))  # (B, T, 2h) -> (B, T, h) -> (B, T, d)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_id)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start_pos)  # (B, T, d)
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
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """See the module docstring."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_emb.weight, 0.0, std)
        if self.lm_head.weight is not self.tok_emb.weight:
            nn.init.normal_(self.lm_head.weight, 0.0, std)
        for layer in self.layers:
            nn.init.normal_(layer.attn.wqkv.weight, 0.0, std)
            nn.init.normal_(layer.attn.wo.weight, 0.0, out_std)
            nn.init.normal_(layer.mlp.w_gate_up.weight, 0.0, std)
            nn.init.normal_(layer.mlp.w_down.weight, 0.0, out_std)
            layer.attn_norm.reset_parameters()
            layer.mlp_norm.reset_parameters()
        self.norm.reset_parameters()

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """Empty cache for this model, on its device and in its parameter dtype unless given."""
        weight = self.tok_emb.weight
        return KVCache(self.cfg, batch_size, max_len, device=device or weight.device, dtype=dtype or weight.dtype)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab_size). With a cache, tokens sit at positions start_pos.. ."""
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
        x = self.tok_emb(tokens)  # (B, T, d)
        cos, sin = self.rope.cos[start_pos:end], self.rope.sin[start_pos:end]  # (T, hd)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, cache, start_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, start_pos)  # (B, T, d)
        return self.lm_head(self.norm(x))  # (B, T, vocab_size)
