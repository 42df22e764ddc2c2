"""Training objectives: what a batch is scored by. The one training loop (``train.py``) calls one.

An objective is a callable ``objective(model, batch) -> (loss_sum, metrics)``:

* ``batch``: a dict of tensors on the device: ``input_ids`` (B, T), ``labels`` (B, T) with -100
  where nothing is learned (prompt, padding, masked documents), optional ``doc_ids`` (B, T) for the
  document mask, and whatever else the objective reads (a teacher's top-k, ...);
* ``loss_sum``: the SUM of the per-token losses over the counted tokens (labels != -100), a scalar;
* ``metrics``: further per-token sums to log (name -> scalar tensor), normalised like the loss.

The loop owns micro-batch synchronisation and normalisation: it divides by the number of counted
tokens of the whole optimizer step, over all micro-batches and ranks (``counted_tokens``, all-reduced
once per step), so accumulation and the number of processes do not change the loss (DESIGN.md,
"Loss normalization"). Pretraining and SFT share ``next_token_objective``; they differ in the labels
their data carries.
"""

from __future__ import annotations

from typing import Callable

import torch

IGNORE = -100
"""Label of a token that is not learned."""

Objective = Callable[[torch.nn.Module, dict], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def counted_tokens(batch: dict) -> torch.Tensor:
    """Tokens whose loss counts in ``batch`` (int64 scalar on the batch's device)."""
    return (batch["labels"] != IGNORE).sum()


def next_token_objective(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed cross-entropy of predicting ``labels`` from ``input_ids`` (pretraining and SFT)."""
    # the model sums the cross-entropy itself, in chunks fused with its output projection (the
    # (tokens x vocab) logits never exist at once), and builds the document mask from doc_ids
    return model(batch["input_ids"], doc_ids=batch.get("doc_ids"), labels=batch["labels"]), {}
