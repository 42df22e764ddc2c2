"""Validation loss and perplexity, during training and of a saved checkpoint (``distllm eval``)."""

from __future__ import annotations

import torch

from distllm import checkpoint
from distllm.config import Config
from distllm.distributed import resolve_device
from distllm.data.loader import BatchLoader, TokenShards
from distllm.errors import DataError
from distllm.loss import next_token_loss
from distllm.metrics import perplexity


def val_batches(shards: TokenShards, seq_len: int, batch_size: int, max_batches: int,
                rank: int = 0, world_size: int = 1) -> int:
    """How many validation micro-batches every process can run (fails early if none)."""
    loader = BatchLoader(shards, seq_len, batch_size, seed=0, shuffle=False, rank=rank, world_size=world_size)
    available = loader.num_samples // (batch_size * world_size)
    if available == 0:
        raise DataError(
            f"the val split has {loader.num_samples} samples of {seq_len + 1} tokens, fewer than one batch "
            f"({batch_size} x {world_size} processes); lower train.micro_batch_size or raise data.val_fraction"
        )
    return min(max_batches, available)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, shards: TokenShards, seq_len: int, batch_size: int, n_batches: int,
                    device: torch.device, rank: int = 0, world_size: int = 1) -> float:
    """Mean next-token loss over the first ``n_batches`` validation batches (same batches every time)."""
    loader = BatchLoader(shards, seq_len, batch_size, seed=0, shuffle=False, rank=rank, world_size=world_size)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(n_batches):
        total += next_token_loss(model, next(loader).to(device))
    model.train(was_training)
    return total / n_batches


def load_for_inference(cfg: Config, spec: str | None):
    """Build the model described by a checkpoint, load its weights, put it on ``train.device``.

    ``spec`` is a checkpoint directory or ``latest`` (default) of ``cfg.run.dir``. The model shape
    comes from the checkpoint's own saved config, so a changed run file cannot mismatch it.
    """
    from distllm.config import from_dict

    path = checkpoint.resolve(spec or "latest", cfg.run.dir)
    if path is None:
        raise checkpoint.CheckpointError(
            f"no complete checkpoint in {checkpoint.checkpoint_dir(cfg.run.dir)}; train first or pass --checkpoint PATH"
        )
    state = checkpoint.read_state(path)
    saved = from_dict({"model": state["config"]["model"]})
    model = saved.model.build()
    checkpoint.load(path, model)
    return model.to(resolve_device(cfg.train.device)).eval(), state, path


def run_eval(cfg: Config, spec: str | None = None) -> dict:
    """``distllm eval``: validation loss / perplexity of a checkpoint on ``cfg.data.dir``'s val split."""
    model, state, path = load_for_inference(cfg, spec)
    device = next(model.parameters()).device
    shards = TokenShards(cfg.data.dir, "val")
    if shards.fingerprint != state["tokenizer_fingerprint"]:
        raise DataError(
            f"the data in {cfg.data.dir} was tokenized with a different tokenizer than checkpoint {path} "
            f"(fingerprint {shards.fingerprint[:12]} != {state['tokenizer_fingerprint'][:12]})"
        )
    seq_len = state["config"]["data"]["seq_len"]
    n = val_batches(shards, seq_len, cfg.train.micro_batch_size, cfg.train.eval_batches)
    loss = validation_loss(model, shards, seq_len, cfg.train.micro_batch_size, n, device).item()
    return {"checkpoint": str(path), "step": state["step"], "val_loss": loss, "val_ppl": perplexity(loss),
            "val_tokens": n * cfg.train.micro_batch_size * seq_len}
