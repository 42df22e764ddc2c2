"""Optimizer and learning-rate schedule.

* AdamW (the fused kernel on CUDA and CPU) with two parameter groups: weight decay on matrices (every parameter with two or
  more dimensions: linear weights and the embedding), none on vectors (norm weights, biases).
* The schedule is a pure function of the step, so a resumed run needs nothing but the step:

  - ``cosine``:   linear warmup 0 -> lr over ``warmup_steps``, then cosine decay to
                  ``min_lr_ratio * lr`` at ``max_steps``.
  - ``wsd``:      warmup, stable at ``lr``, then linear decay to the floor over the last
                  ``decay_fraction * max_steps`` steps (warmup-stable-decay).
  - ``constant``: warmup, then ``lr``.
"""

from __future__ import annotations

import math

import torch

from distllm.config import OptimConfig
from distllm.deepspeed_fence import full_shape


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into decayed matrices and non-decayed vectors (shared tensors once)."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        shape = full_shape(p)  # a ZeRO-3 parameter is an empty placeholder of another shape
        (decay if len(shape) >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def apply_config(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Set betas, eps and weight decay from the config (the groups of ``param_groups``). Loading an
    optimizer state restores the saved values; a resumed run with a changed optim section uses the new ones."""
    for group in optimizer.param_groups:
        group["betas"], group["eps"] = (cfg.beta1, cfg.beta2), cfg.eps
    optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay  # matrices; vectors stay at 0


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    # the fused kernel exists for CUDA and (since torch 2.4) CPU; measured 3x faster than foreach on CPU
    fused = cfg.fused if cfg.fused is not None else device_type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
    )


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
        progress = min(progress, 1.0)
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    # wsd
    decay_steps = max(1, round(cfg.decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return peak
    progress = min((step - decay_start) / decay_steps, 1.0)
    return peak + (floor - peak) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
