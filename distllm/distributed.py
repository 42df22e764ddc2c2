"""The one place that talks to Accelerate / torch.distributed.

``setup(train_cfg)`` picks the device and precision and returns a ``Runtime``;
``Runtime.parallelize(model, optimizer)`` applies everything that is not model code:
activation checkpointing, ``torch.compile``, and Accelerate's wrapping (DDP today,
DeepSpeed later). Model code stays single-device.

Rank and world size come from torch.distributed when it is initialised (Accelerate's own
counters can disagree under DeepSpeed on CPU), so data sharding never trusts anything else.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch

from distllm.config import TrainConfig
from distllm.errors import ConfigError


@dataclass
class Runtime:
    accelerator: "object"  # accelerate.Accelerator (imported lazily: it is slow to import)
    device: torch.device
    precision: str  # "fp32" | "bf16"
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matmuls run in (for the MFU peak)."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def parallelize(self, model: torch.nn.Module, optimizer, cfg: TrainConfig):
        """Wrap a single-device model and its optimizer for this runtime."""
        model.activation_checkpointing = cfg.activation_checkpointing
        if cfg.compile:
            model = torch.compile(model)
        return self.accelerator.prepare(model, optimizer)

    def no_sync(self, model, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model, max_norm: float) -> float:
        """Clip gradients to ``max_norm`` (0 = no clipping); return the global norm before clipping."""
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
        return float(norm)

    def unwrap(self, model) -> torch.nn.Module:
        model = self.accelerator.unwrap_model(model)
        return getattr(model, "_orig_mod", model)  # torch.compile wrapper

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a scalar tensor over processes."""
        if self.world_size == 1:
            return value
        return self.accelerator.reduce(value.to(self.device), reduction="mean")

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def resolve_device(name: str) -> torch.device:
    """``train.device`` -> a torch device: ``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA GPU is available (use --train.device=cpu)")
    return torch.device(name)


def setup(cfg: TrainConfig) -> Runtime:
    from accelerate import Accelerator

    device_type = resolve_device(cfg.device).type

    precision = cfg.precision
    if precision == "auto":
        bf16_ok = device_type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16_ok else "fp32"  # CPU bf16 matmul is far slower than fp32
    if precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision is 'bf16' but this GPU does not support bfloat16 (use fp32)")

    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed (imported by Accelerate) would probe for GPUs
    accelerator = Accelerator(
        cpu=device_type == "cpu",
        mixed_precision="bf16" if precision == "bf16" else "no",
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world_size = accelerator.process_index, accelerator.num_processes
    return Runtime(accelerator, accelerator.device, precision, rank, world_size)
