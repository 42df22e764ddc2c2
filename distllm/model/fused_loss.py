"""Cross-entropy fused with the output projection, in chunks of tokens: the (tokens x vocab) logits
never exist at once.

    linear_cross_entropy(hidden (N, d), weight (V, d), labels (N,)) -> fp32 scalar
        = sum over n with labels[n] != -100 of  logsumexp(hidden[n] @ weight.T) - (hidden[n] @ weight.T)[labels[n]]

The unfused path (``logits = model(x)``, then a cross-entropy) keeps the logits in the model's dtype,
an fp32 copy for the softmax and an (N, V) gradient: at llama-1b's 8 x 2048 tokens and 128,256-token
vocabulary each fp32 copy is 8 GiB (about 15.7 GiB for the loss). Here the tokens go through in
chunks of ``chunk_tokens`` rows (by default an eighth of the tokens, at least ``MIN_CHUNK_TOKENS``):
for each chunk the logits (C, V) are computed, upcast to fp32, turned into log-probabilities in
place, and (when a gradient is wanted) at once into the logits' gradient softmax - onehot, from
which the chunk's rows of d hidden and its share of d weight follow; then the chunk is dropped. So
the gradients are computed in the forward pass (as Liger-Kernel's FusedLinearCrossEntropy does)
and the backward only scales them by the incoming gradient: the same three matmuls as the unfused
path (logits, d hidden, d weight), no recomputation, and the weight is never needed in backward,
which suits ZeRO-3 (the head module's hooks gather the weight around this forward).

Precision: the matmuls run in the autocast dtype when autocast is on (else in the inputs' dtype), the
softmax in fp32, and d weight accumulates over the chunks in fp32 (one bf16 rounding per chunk's
product, as the unfused bf16 path rounds its one product; summing the chunks in bf16, as
Liger-Kernel does, rounds the running sum once per chunk: 1.6x the error at 16 chunks in
tests/model/test_fused_loss.py). The price in bf16 is a (V, d) bf16 product per chunk added to the
fp32 sum: about 12 bytes per weight element per chunk of memory traffic, a few percent of a
llama-1b step at the default 8 chunks (CUDA's fp32-output ``addmm`` could add in place; not used
until measured on a GPU).
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
LOSS_CHUNKS = 8  # default number of token chunks (each chunk's fp32 logits are 1/8 of a full copy)
MIN_CHUNK_TOKENS = 1024  # ... but no chunk smaller than this (small matmuls waste the GPU)


def default_chunk_tokens(n_tokens: int) -> int:
    """Tokens per chunk: an eighth of them (rounded up), at least ``MIN_CHUNK_TOKENS``."""
    return max(MIN_CHUNK_TOKENS, math.ceil(n_tokens / LOSS_CHUNKS))


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmuls' dtype: autocast's where it is on for the device (what ``F.linear`` would use), else
    the promoted dtype of hidden and weight."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def chunked_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                           want_dhidden: bool, want_dweight: bool):
    """(loss sum fp32, d loss / d hidden or None, d loss / d weight in at least fp32 or None); see the
    module docstring.

    hidden (N, d), weight (V, d), labels (N,) int64 with ``IGNORE_INDEX`` where nothing is counted."""
    dtype = compute_dtype(hidden, weight)
    device_type = hidden.device.type
    N = hidden.size(0)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dhidden = torch.empty_like(hidden) if want_dhidden else None  # (N, d), hidden's dtype
    acc_dtype = torch.promote_types(dtype, torch.float32)  # d weight's sum: at least fp32
    dweight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_dweight else None  # (V, d)
    with torch.autocast(device_type, enabled=False):
        w = weight.to(dtype)  # (V, d); no copy when already in dtype
        for start in range(0, N, chunk_tokens):
            h = hidden[start : start + chunk_tokens].to(dtype)  # (C, d)
            y = labels[start : start + chunk_tokens]  # (C,)
            counted = y != IGNORE_INDEX  # (C,) bool
            target = y.clamp(min=0)[:, None]  # (C, 1): ignored rows point at class 0 and are masked below
            logp = (h @ w.T).float()  # (C, V) fp32: the only chunk-sized fp32 buffer
            torch.log_softmax(logp, dim=-1, out=logp)  # in place: each row is read before it is written
            loss -= logp.gather(1, target).squeeze(1).masked_fill(~counted, 0.0).sum()
            if not (want_dhidden or want_dweight):
                continue
            grad = logp.exp_()  # softmax, in place
            grad.scatter_add_(1, target, grad.new_full(target.shape, -1.0))  # softmax - onehot
            grad = grad.to(dtype)  # (C, V) for the matmuls (no copy in fp32)
            # ignored rows: their gradient rows are zeroed in the (C, d) results, not in the (C, V) grad
            keep = counted[:, None].to(dtype)  # (C, 1)
            if want_dhidden:
                dhidden[start : start + chunk_tokens] = (grad @ w).mul_(keep)  # (C, d)
            if want_dweight:
                h_kept = h * keep  # (C, d): ignored tokens add nothing to d weight
                if dtype == acc_dtype:
                    dweight.addmm_(grad.T, h_kept)  # (V, d) += (V, C) @ (C, d)
                else:
                    dweight += grad.T @ h_kept  # a (V, d) product in bf16, summed in fp32
            del grad, logp
    return loss, dhidden, dweight


class LinearCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of ``hidden @ weight.T`` against ``labels``, gradients computed in the
    forward pass chunk by chunk (``chunked_loss_and_grads``); the backward scales them by the
    incoming gradient, in place, so it runs once."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int):
        want_dhidden, want_dweight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dhidden, dweight = chunked_loss_and_grads(hidden, weight, labels, chunk_tokens, want_dhidden, want_dweight)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(dhidden, dweight)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        dhidden, dweight = ctx.saved_tensors
        if dhidden is not None:
            dhidden = dhidden.mul_(grad)
        if dweight is not None:
            dweight = dweight.mul_(grad).to(ctx.weight_dtype)
        return dhidden, dweight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_tokens: int | None = None) -> torch.Tensor:
    """Sum over tokens with ``labels != -100`` of the cross-entropy of ``hidden @ weight.T`` (fp32 scalar),
    in chunks of ``chunk_tokens`` tokens (None: ``default_chunk_tokens``). hidden (N, d), weight (V, d),
    labels (N,). Differentiable in hidden and weight; without gradients only the loss is computed."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"need hidden (N, d) and labels (N,); got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    chunk = chunk_tokens or default_chunk_tokens(hidden.size(0))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, labels, chunk)
    return chunked_loss_and_grads(hidden, weight, labels, chunk, False, False)[0]
