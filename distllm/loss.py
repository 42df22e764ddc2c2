"""The pretraining objective: next-token cross-entropy on a window of T+1 tokens."""

import torch
import torch.nn.functional as F


def next_token_loss(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``window[:, 1:]`` from ``window[:, :-1]``.

    window: (B, T+1) token ids. Logits are upcast to fp32 for the softmax.
    """
    inputs, targets = window[:, :-1], window[:, 1:]  # (B, T), (B, T)
    logits = model(inputs)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
