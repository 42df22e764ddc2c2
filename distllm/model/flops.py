"""Parameter counts, training FLOPs per token, peak device FLOP/s and model FLOPs utilisation (MFU).

Training FLOPs per token (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", section 2.1;
Chowdhery et al. 2022, "PaLM", appendix B)::

    flops_per_token = 6 * N + 12 * n_layers * d_model * seq_len

* ``6 * N``: every parameter that takes part in a matmul costs 2 FLOPs per token in the forward pass
  (a multiply and an add) and 4 in the backward pass (gradients w.r.t. the input and the weight).
  N = ``count_params(cfg, exclude_embedding=True)``: all parameters except the input embedding table
  (a lookup, no matmul); the output projection is counted even when it shares its matrix with the
  embedding. The RMSNorm weights are included (d_model * (2 * n_layers + 1), negligible).
* ``12 * n_layers * d_model * seq_len``: the attention scores Q K^T and the weighted sum A V are
  matmuls against activations, not parameters: 2 * 2 * d_model * seq_len FLOPs per token and layer
  in the forward pass, times 3 for forward + backward. The causal mask is not discounted (as in PaLM):
  this counts the full seq_len x seq_len score matrix although half of it is masked.

MFU = tokens/s * flops_per_token / peak FLOP/s.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn as nn

from distllm.config import ModelConfig

# Dense (no sparsity) bf16 tensor-core peaks from the NVIDIA datasheets, in FLOP/s; fp16 for the
# GPUs without bf16 (V100, T4). Matched as substrings of torch.cuda.get_device_name(), first match
# wins, so the more specific names come first.
GPU_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 6000 Ada", 364e12),
    ("A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


def count_params(cfg_or_model: ModelConfig | nn.Module, exclude_embedding: bool = False) -> int:
    """Number of parameters of a ModelConfig's model or of a built Transformer (shared tensors once).

    ``exclude_embedding=True`` leaves out the input embedding table, whose lookup does no matmul, but
    keeps it when it is tied to the output projection (the same matrix is then used in a matmul, as
    in nanoGPT's ``get_num_params``): the result is the N of ``flops_per_token``.
    """
    if isinstance(cfg_or_model, ModelConfig):
        c = cfg_or_model
        attn = c.d_model * (c.n_heads + 2 * c.kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.d_model
        mlp = 3 * c.d_model * c.hidden_dim
        body = c.n_layers * (attn + mlp + 2 * c.d_model) + c.d_model  # blocks with their 2 norms, final norm
        matrix = c.vocab_size * c.d_model
        embedding = 0 if exclude_embedding else matrix
        head = matrix if (exclude_embedding or not c.tie_embeddings) else 0
        return body + embedding + head
    model = cfg_or_model
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    if exclude_embedding and model.tok_emb.weight is not model.lm_head.weight:
        total -= model.tok_emb.weight.numel()
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at sequence length seq_len; see the module docstring."""
    n = count_params(cfg, exclude_embedding=True)
    return float(6 * n + 12 * cfg.n_layers * cfg.d_model * seq_len)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s as a fraction of peak_flops."""
    return tokens_per_s * flops_per_token / peak_flops


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float:
    """Peak FLOP/s of one device for ``dtype``.

    CUDA with bf16/fp16: the datasheet dense peak of a known GPU (``GPU_PEAK_FLOPS``). Otherwise (CPU,
    unknown GPU, fp32) the measured throughput of a square matmul in ``dtype`` (fp32 on CPU unless
    another dtype is given), timed for well under a second and cached per process. A measured CPU
    "peak" is what torch.matmul achieves on this machine with the current thread count, so CPU MFU
    is relative to that, not to a datasheet figure.
    """
    device = torch.device(device)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # the CPU path trains in fp32
    return measured_matmul_flops(device.type, device.index, dtype)


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(device_type: str, device_index: int | None, dtype: torch.dtype) -> float:
    """Best FLOP/s of repeated n x n matmuls (n = 1024 on CPU, 4096 on GPUs) within about 0.3 s."""
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    n = 1024 if device.type == "cpu" else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b)  # warm-up
    sync()
    best, deadline = 0.0, time.perf_counter() + 0.3
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best
