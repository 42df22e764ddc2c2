"""Validation loss and perplexity, during training and of a saved checkpoint (``distllm eval``).

The validation set is the first ``eval_batches x micro_batch_size`` samples of the val split, in
order: the same samples for any number of processes. Rank r evaluates samples r, r + N, r + 2N, ...;
the per-sample losses are summed over ranks, so 1 and 2 processes report the same mean (up to float
summation order). Every rank runs the same number of forward passes (a rank with nothing left runs
a zero-weight pass), which ZeRO-3's collective forward needs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from distllm import checkpoint
from distllm.batch_plan import validation_micro_batch
from distllm.config import Config
from distllm.data.loader import SampleIndex, TokenShards
from distllm.data.storage import storage_kwargs
from distllm.distributed import resolve_device
from distllm.errors import DataError
from distllm.loss import next_token_loss
from distllm.metrics import perplexity
from distllm.model import Transformer


class ValidationSet:
    """This rank's share of the fixed validation samples, in micro-batches."""

    def __init__(self, shards: TokenShards, seq_len: int, micro_batch_size: int, eval_batches: int,
                 rank: int = 0, world_size: int = 1):
        self.samples = SampleIndex(shards, seq_len)
        wanted = eval_batches * micro_batch_size
        self.num_samples = min(wanted, len(self.samples))
        if self.num_samples == 0:
            raise DataError(f"the val split of {shards.data_dir} has no sample of {seq_len + 1} tokens; "
                            "raise data.val_fraction or lower data.seq_len")
        self.batch_size = micro_batch_size
        self.mine = np.arange(rank, self.num_samples, world_size)
        per_rank = math.ceil(self.num_samples / world_size)
        self.num_batches = math.ceil(per_rank / micro_batch_size)

    def batches(self):
        """(tokens (b, seq_len + 1), weight) pairs; weight 0 marks a padding pass."""
        for k in range(self.num_batches):
            ids = self.mine[k * self.batch_size : (k + 1) * self.batch_size]
            if len(ids) == 0:  # a zero-weight pass on sample 0
                yield torch.from_numpy(self.samples.read(np.zeros(1, dtype=np.int64))), 0
            else:
                yield torch.from_numpy(self.samples.read(ids)), len(ids)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, val: ValidationSet, device: torch.device, rt=None) -> float:
    """Mean next-token loss over the whole validation set (all ranks take part when ``rt`` is given)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of sample losses, samples)
    for tokens, weight in val.batches():
        loss = next_token_loss(model, tokens.to(device))
        total[0] += loss.double() * weight
        total[1] += weight
    model.train(was_training)
    if rt is not None:
        total = rt.sum(total)
    return (total[0] / total[1]).item()


def load_for_inference(cfg: Config, target: str | None):
    """Build the model a checkpoint was trained with, load its weights, put it on ``train.device``.

    ``target`` is a run directory or a checkpoint directory (default: ``run.dir``). The model shape
    comes from the checkpoint's own saved config, so a changed run file cannot mismatch it.
    """
    from distllm.config import from_dict

    path = checkpoint.locate(target or cfg.run.dir)
    state = checkpoint.read_state(path)
    saved = from_dict({"model": state["config"]["model"]})
    model = Transformer(saved.model)
    checkpoint.load_weights(path, model)
    return model.to(resolve_device(cfg.train.device)).eval(), state, path


def run_eval(cfg: Config, target: str | None = None) -> dict:
    """``distllm eval``: validation loss / perplexity of a checkpoint on its data's val split."""
    model, state, path = load_for_inference(cfg, target)
    device = next(model.parameters()).device
    shards = TokenShards(cfg.data.dir, "val", storage=storage_kwargs(cfg.data))
    if shards.fingerprint != state["tokenizer_fingerprint"]:
        raise DataError(
            f"the data in {cfg.data.dir} was tokenized with a different tokenizer than checkpoint {path} "
            f"(fingerprint {shards.fingerprint[:12]} != {state['tokenizer_fingerprint'][:12]})"
        )
    seq_len = state["config"]["data"]["seq_len"]
    val = ValidationSet(shards, seq_len, validation_micro_batch(cfg.train.global_batch_size, cfg.train.micro_batch_size),
                        cfg.train.eval_batches)
    loss = validation_loss(model, val, device)
    return {"checkpoint": str(path), "step": state["step"], "val_loss": loss, "val_ppl": perplexity(loss),
            "val_tokens": val.num_samples * seq_len}
