"""The model's hand-tuned pieces: autograd Functions with hand-written backwards, RoPE, and the
choice of RMSNorm and attention kernels. ``transformer.py`` holds the math; this module holds the
ways of computing it that were measured to be faster or leaner than autograd's default.

Why hand-written backwards (measured on CPU, fp32, 2 threads; see the README's benchmark section):
autograd differentiates composite ops op by op, allocating a fresh tensor for every intermediate
gradient, and on CPU every fresh large tensor costs page faults. Three Functions replace it:

* ``QKVRoPEFunction``: RoPE on q and k in one call; its backward writes the inverse rotations of dq
  and dk and a copy of dv straight into the fused qkv gradient (autograd would build the three apart
  and then concatenate them).
* ``SwiGLUFunction``: silu(gate) * up; its backward writes both gradient halves into the spent
  gate_up buffer in place (no new (..., 2h) tensor).
* ``RMSNormFunction``: saves only x and the per-row rsqrt; used wherever torch has no fused
  RMSNorm backward for the device (see ``rms_norm``).

Together with the in-place cross-entropy (``distllm/loss.py``) they took the training step from
about 77k to 19k page faults and made it 1.10-1.21x faster than Hugging Face ``LlamaForCausalLM``
of the same shape (``benchmarks/bench_train_step.py``). tests/model checks every backward against
plain autograd (gradcheck in fp64).

Under ``torch.compile`` (``train.compile``) each of them gives way to plain tensor ops
(``torch.compiler.is_compiling()``): their ``out=`` writes into strided views are graph breaks
(a block fell into 13 graphs), while Inductor fuses the plain ops itself, so a compiled block is
one graph with no break (tests/model/test_compile.py).

Attention restricted to packed documents (``doc_ids``) runs FlexAttention with a block mask on
CUDA (``use_flex_attention``; flash-class kernels, no (B, 1, T, T) mask) and SDPA with the dense
mask elsewhere. ``enable_tf32_matmuls`` is the process-wide fp32 matmul setting for CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------

_fused_rms_norm = getattr(torch.ops.aten, "_fused_rms_norm", None)  # torch >= 2.8 (MPS), 2.9 (CUDA)
_fused_backward_cache: dict[str, bool] = {}


@torch.compiler.assume_constant_result  # torch.compile calls it once while tracing and keeps the answer
def has_fused_rms_norm_backward(device_type: str) -> bool:
    """Whether this torch has a fused RMSNorm backward kernel for ``device_type``.

    torch composed ``F.rms_norm`` from elementwise ops on every device (autograd then differentiates
    it op by op) until 2.9 added fused CUDA kernels for both passes (``aten._fused_rms_norm`` and
    ``aten._fused_rms_norm_backward``, pytorch#153666; XPU followed). 2.8 had a fused forward on MPS
    only, and no build has a CPU backward. Rather than trust a version number, this asks the
    dispatcher once per device type: a kernel-less backend raises NotImplementedError.
    """
    if device_type not in _fused_backward_cache:
        op = getattr(torch.ops.aten, "_fused_rms_norm_backward", None)
        ok = False
        if op is not None:
            x = torch.ones(1, 2, device=device_type)
            try:
                op(x, x, [2], x[:, :1], x[0], [True, True])
                ok = True
            except (NotImplementedError, RuntimeError):
                ok = False
        _fused_backward_cache[device_type] = ok
    return _fused_backward_cache[device_type]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * weight.

    torch's ``F.rms_norm`` where torch has a fused backward for the device (CUDA from torch 2.9) or
    no gradient is needed; otherwise ``RMSNormFunction``, whose backward is two passes and saves only
    x and the per-row rsqrt, where autograd's op-by-op backward of the composite takes about a dozen
    passes and keeps several intermediates (CPU always, CUDA with torch < 2.9, MPS).
    """
    if torch.compiler.is_compiling():  # Inductor fuses the composite and differentiates it itself
        return F.rms_norm(x, weight.shape, weight, eps)
    if torch.is_grad_enabled() and not has_fused_rms_norm_backward(x.device.type):
        return RMSNormFunction.apply(x, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward.

    The forward is torch's ``_fused_rms_norm`` where this torch has it (one call; it has no CPU
    backward), else the composite in at least fp32; it saves only x and the per-row
    r = rsqrt(mean(x^2) + eps). With y = x r w, a = dy r and t = a x = dy x_hat:

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


# ---------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables (max_seq_len, head_dim) in fp32 for ``apply_rope``: [cos, cos] and [-sin, sin] of
    the angles position * theta^(-2i / head_dim), i < head_dim / 2 (each half of the head uses every frequency).

    Every floating tensor here comes from ``.float()`` of an integer ``arange``, never from a floating
    constructor: ``deepspeed.zero.Init(dtype=bf16)`` (ZeRO-3) wraps ``torch.arange`` and the other
    constructors and casts whatever floating tensor they return to bf16, which holds integers
    exactly only up to 256 (4,096 positions became 769 distinct rotations)."""
    exponent = torch.arange(0, head_dim, 2, device=device).float() / head_dim  # int64 -> fp32
    inv_freq = 1.0 / theta**exponent  # (hd/2,)
    pos = torch.arange(max_seq_len, device=device).float()  # exact up to 2^24
    angles = torch.outer(pos, inv_freq)  # (max_seq_len, hd/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def rope_plain(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` in plain tensor ops (for torch.compile): x cos + [x2, x1] sin with the tables'
    [-sin, sin], i.e. [x1 cos - x2 sin, x2 cos + x1 sin]; products in fp32, result in x's dtype."""
    half = x.size(-1) // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # [x2, x1]
    return (x * cos[:, None] + swapped * sin[:, None]).to(x.dtype)


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


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int):
    """q, k rotated and v from the fused projection qkv (B, T, nh + 2 nkv, hd): ``QKVRoPEFunction``
    in eager mode, plain ops under torch.compile."""
    if torch.compiler.is_compiling():
        qk = rope_plain(qkv[:, :, : nh + nkv], cos, sin)  # (B, T, nh + nkv, hd)
        return qk[:, :, :nh], qk[:, :, nh:], qkv[:, :, nh + nkv :]
    return QKVRoPEFunction.apply(qkv, cos, sin, nh, nkv)


# ---------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up = [gate, up] (..., 2h) -> (..., h): ``SwiGLUFunction`` in eager mode,
    plain ops under torch.compile."""
    if torch.compiler.is_compiling():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    return SwiGLUFunction.apply(gate_up)



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


# ---------------------------------------------------------------------------------------------
# Attention: how grouped-query k/v reach scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------

FLASH_MAX_HEAD_DIM = 256


@torch.compiler.assume_constant_result
def cuda_flash_capable(device_index: int | None) -> bool:
    """The GPU can run SDPA's flash kernel (compute capability 8.0+, i.e. Ampere and newer) and it
    has not been switched off with ``torch.backends.cuda.enable_flash_sdp(False)``."""
    return torch.cuda.get_device_capability(device_index) >= (8, 0) and torch.backends.cuda.flash_sdp_enabled()


def use_enable_gqa(device_type: str, dtype: torch.dtype, masked: bool, head_dim: int, flash_capable: bool) -> bool:
    """How k/v heads shared by several query heads reach SDPA: True = ``enable_gqa=True`` (no copy
    of k/v), False = repeat them to one per query head first.

    ``enable_gqa`` is implemented only by SDPA's flash and math kernels; where flash cannot run, SDPA
    falls back to the math kernel, which materialises the (B, nh, T, S) score matrix: O(T^2) memory.
    Repeating k/v costs O(T) memory and lets the memory-efficient kernel (fp32, masks, older GPUs) run.

    * CPU: ``enable_gqa`` (measured ~15% faster than repeating k/v, forward + backward; the CPU flash
      kernel takes GQA with or without a mask).
    * CUDA: ``enable_gqa`` only where flash runs: fp16/bf16, no explicit mask (KV-cache prefill has
      one; ``is_causal`` and a cache decode step have none), head_dim <= 256, ``flash_capable``
      (``cuda_flash_capable``). Otherwise (fp32, pre-Ampere GPUs, masked prefill) repeat k/v.
    * Other devices: repeat k/v (plain multi-head attention runs on every backend).
    """
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return flash_capable and dtype in (torch.float16, torch.bfloat16) and not masked and head_dim <= FLASH_MAX_HEAD_DIM
    return False


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, S, hd) -> (B, nkv * n_rep, S, hd), each kv head repeated for its n_rep query heads
    (the same as ``x.repeat_interleave(n_rep, dim=1)``)."""
    B, nkv, S, hd = x.shape
    return x[:, :, None].expand(B, nkv, n_rep, S, hd).reshape(B, nkv * n_rep, S, hd)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v with q (B, nh, T, hd) and k, v (B, nkv, S, hd), nh a multiple
    of nkv (query head i uses kv head i // (nh / nkv)) -> (B, nh, T, hd). See ``use_enable_gqa``."""
    nh, nkv = q.size(1), k.size(1)
    gqa = False
    if nh != nkv:
        flash = q.device.type == "cuda" and cuda_flash_capable(q.device.index)
        gqa = use_enable_gqa(q.device.type, q.dtype, attn_mask is not None, q.size(-1), flash)
        if not gqa:
            k, v = repeat_kv(k, nh // nkv), repeat_kv(v, nh // nkv)  # (B, nh, S, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=gqa)


# ---------------------------------------------------------------------------------------------
# Attention inside packed documents: FlexAttention on CUDA, a dense mask elsewhere
# ---------------------------------------------------------------------------------------------


def use_flex_attention(device_type: str) -> bool:
    """Whether the document mask (``doc_ids``) runs as a FlexAttention block mask: on CUDA only.

    A dense (B, 1, T, T) mask rules out SDPA's flash kernel (the memory-efficient kernel takes it,
    reading the whole mask); FlexAttention's Triton kernels skip the blocks no query of a document
    may see and never build the mask. torch 2.13's FlexAttention on CPU has a forward only (no
    backward), so CPU training keeps the dense mask; the two are tested equal there in eval mode.
    """
    return device_type == "cuda"


def document_mask(doc_ids: torch.Tensor):
    """(B, T) document ids -> what ``attention_in_documents`` takes: a FlexAttention ``BlockMask``
    where ``use_flex_attention``, else the dense (B, 1, T, T) bool mask (True = may attend). Built
    once per forward and shared by every layer."""
    from distllm.data.packing import document_attention_mask, document_block_mask

    if use_flex_attention(doc_ids.device.type):
        return document_block_mask(doc_ids)
    return document_attention_mask(doc_ids)


_compiled_flex_attention = None


def attention_in_documents(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Causal attention within documents: q (B, nh, T, hd), k, v (B, nkv, T, hd), ``mask`` from
    ``document_mask`` -> (B, nh, T, hd).

    A ``BlockMask`` goes to FlexAttention (grouped-query k/v natively, no copy). Flex must be compiled
    to be fast: inside a compiled block it is part of the block's graph; in eager mode a module-level
    ``torch.compile(flex_attention)`` (compiled once, on first use) runs it on CUDA. A dense mask goes
    to SDPA (``attention``)."""
    if isinstance(mask, torch.Tensor):
        return attention(q, k, v, attn_mask=mask)
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex_attention
    flex = flex_attention
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        if _compiled_flex_attention is None:
            _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
        flex = _compiled_flex_attention
    return flex(q, k, v, block_mask=mask, enable_gqa=q.size(1) != k.size(1))


# ---------------------------------------------------------------------------------------------
# fp32 matmuls on CUDA
# ---------------------------------------------------------------------------------------------


def enable_tf32_matmuls(device_type: str) -> bool:
    """Let fp32 matmuls use TF32 tensor cores on CUDA (``torch.set_float32_matmul_precision("high")``;
    cuDNN convolutions already do by default). Process-wide; call it once when the device is known
    (``distributed.setup``). Returns whether it changed anything: on other devices it does nothing
    (on CPU "high" would let oneDNN round fp32 matmuls to bf16 passes).

    Under bf16 autocast the model's matmuls run in bf16 anyway; what TF32 speeds up is whatever stays
    fp32: fp32 runs (``train.precision: fp32``), fp32 evaluation and tools (``distllm eval``,
    ``generate``), and the measured peak of ``flops.measured_matmul_flops`` for fp32."""
    if device_type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    return True
