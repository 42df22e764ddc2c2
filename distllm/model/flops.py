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

MFU = tokens/s * flops_per_token / peak FLOP/s, never reported above 1 (see ``mfu``), and None
(printed "n/a") when the peak is unknown.

The peak: ``logging.peak_flops`` when set; else for bf16/fp16 on a GPU the vendor's dense datasheet
peak of a known model (``GPU_PEAK_FLOPS``, matched against ``torch.cuda.get_device_name``), and None
for a GPU not in the table (a measured or guessed figure would give a wrong MFU); else (CPU, fp32
on a GPU) the measured matmul throughput, the best of several trials spread over a few seconds,
cached per machine in ``peak_flops.json`` under the user cache directory (keyed by device model,
thread count and dtype) so a busy moment in one run does not set every run's MFU.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import time
from pathlib import Path

import torch
import torch.nn as nn

from distllm.model.config import ModelConfig

logger = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, in FLOP/s (fp16 for the
# GPUs without bf16: V100, T4). Each pattern is a regular expression searched in
# torch.cuda.get_device_name() with word boundaries (so "L4" is not "L40" and "B200" is not "GB200");
# the first match wins, so the more specific names come first. A GPU that matches none has no known
# peak: its MFU is None, not a wrong figure.
GPU_PEAK_FLOPS = (
    (r"H200 NVL", 835e12),
    (r"GH200", 989e12),  # Grace Hopper superchip: the H100/H200-class GPU
    (r"H200", 989e12),  # SXM
    (r"H100 NVL", 835e12),
    (r"H100 PCIe", 756e12),
    (r"H100", 989e12),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    (r"H800 PCIe", 756e12),
    (r"H800", 989e12),
    (r"B200", 2250e12),  # HGX B200 (not GB200)
    (r"A100", 312e12),
    (r"A800", 312e12),
    (r"L40S", 362e12),
    (r"L40", 181e12),
    (r"L4", 121e12),
    (r"A10G", 70e12),
    (r"A10", 125e12),
    (r"RTX 6000 Ada", 364e12),
    (r"A6000", 155e12),
    (r"RTX 4090", 165e12),
    (r"RTX 3090", 71e12),
    (r"V100", 125e12),
    (r"T4", 65e12),
)


def datasheet_peak(device_name: str) -> float | None:
    """The dense bf16 (fp16) datasheet peak of the GPU called ``device_name``, None if it is not in
    ``GPU_PEAK_FLOPS``."""
    for pattern, flops in GPU_PEAK_FLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){pattern}(?![A-Za-z0-9])", device_name):
            return flops
    return None


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


_mfu_warned = False


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s as a fraction of peak_flops, at most 1; None when
    the peak is unknown (``peak_flops`` None: a GPU not in the datasheet table).

    Above 1 the peak must be underestimated (measured while the machine was busy): the value is
    clamped to 1 and a warning, once per process, names the cache file to delete (or
    ``logging.peak_flops`` to set)."""
    global _mfu_warned
    if peak_flops is None:
        return None
    value = tokens_per_s * flops_per_token / peak_flops
    if value > 1.0:
        if not _mfu_warned:
            _mfu_warned = True
            logger.warning(
                "MFU came out at %.0f%%: the peak of %.3g FLOP/s is underestimated (measured on a busy machine?); "
                "reporting 100%%. Set logging.peak_flops, or delete %s to measure again.",
                100 * value, peak_flops, peak_cache_file(),
            )
        return 1.0
    return value


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak FLOP/s of one device for ``dtype``; None when unknown.

    CUDA with bf16/fp16: the datasheet dense peak of a known GPU (``datasheet_peak``), None for a GPU
    not in the table. Otherwise (CPU, fp32 on a GPU) the measured matmul throughput
    (``measured_matmul_flops``) in ``dtype`` (fp32 on CPU, which trains in fp32), cached per machine
    (``cached_peak``). A measured CPU "peak" is what torch.matmul sustains on this machine with the
    current thread count, so CPU MFU is relative to that, not to a datasheet figure.
    """
    device = torch.device(device)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return datasheet_peak(torch.cuda.get_device_name(device))
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # the CPU path trains in fp32
    return cached_peak(machine_key(device, dtype), lambda: measured_matmul_flops(device.type, device.index, dtype),
                       quick=lambda: measured_matmul_flops(device.type, device.index, dtype, trials=1))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    """Cache key of a measured peak: device model, (CPU) thread count, dtype."""
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cpu":
        return f"cpu | {cpu_model()} | {torch.get_num_threads()} threads | {dtype_name}"
    model = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{device.type} | {model} | {dtype_name}"


def peak_cache_file() -> Path:
    """``$DISTLLM_CACHE_DIR/peak_flops.json``, else under ``$XDG_CACHE_HOME/distllm`` (``~/.cache/distllm``)."""
    root = os.environ.get("DISTLLM_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distllm"
    return Path(root) / "peak_flops.json"


_peaks: dict[str, float] = {}  # this process's answers, so the file is read once per key


def cached_peak(key: str, measure, quick=None) -> float:
    """The peak stored under ``key`` in ``peak_cache_file()``; else ``measure()``, stored there
    (atomically; an unwritable cache only costs a measurement per process).

    The cache is a ratchet: with ``quick`` (one short trial) a process that measures more than the
    cached figure raises it, so a peak first measured on a busy machine heals on a quiet one."""
    if key in _peaks:
        return _peaks[key]
    path = peak_cache_file()
    try:
        table = json.loads(path.read_text())
        table = table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        table = {}
    value = table.get(key)
    fresh = None
    if not (isinstance(value, (int, float)) and value > 0):
        fresh = value = float(measure())
    elif quick is not None and (q := float(quick())) > value:
        fresh = value = q
    if fresh is not None:
        table[key] = value
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError as e:
            logger.debug("could not cache the peak FLOP/s in %s: %s", path, e)
    _peaks[key] = float(value)
    return _peaks[key]


def measured_matmul_flops(device_type: str, device_index: int | None, dtype: torch.dtype,
                          trials: int = 5, seconds: float = 0.3, pause: float = 0.2) -> float:
    """Best FLOP/s of one n x n matmul (n = 1024 on CPU, 4096 on GPUs) over ``trials`` trials of
    ``seconds`` each, ``pause`` apart: a busy moment spoils a trial, not the result."""
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    n = 1024 if device.type == "cpu" else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b)  # warm-up
    sync()
    best = 0.0
    for trial in range(trials):
        if trial:
            time.sleep(pause)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best
