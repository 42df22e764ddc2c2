"""The pretraining objective: next-token cross-entropy on a window of T+1 tokens.

The model computes the loss itself: ``model(inputs, doc_ids=..., labels=targets)`` returns the SUM of
the token cross-entropies, chunked and fused with the output projection
(``distllm/model/fused_loss.py``), so the (tokens x vocab) logits never exist at once.
``next_token_loss`` is the mean of that over a window's tokens. ``cross_entropy`` is the unfused
loss on logits a caller already has (kept as the reference the fused loss is tested against).
"""

import torch


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, V) against class indices targets (N,): F.cross_entropy's value
    and gradient, with less memory traffic.

    F.cross_entropy writes the log-probabilities to a new (N, V) tensor; its backward allocates a
    zero-filled (N, V) gradient for nll_loss, scatters into it, then allocates another (N, V) for
    log_softmax's backward. The gradient is simply (softmax(logits) - onehot(targets)) / N, so here
    one (N, V) buffer serves throughout: backward turns the saved log-probabilities into the gradient
    in place, with one exp, one scatter and one scale. With ``consume=True`` that buffer is the logits
    themselves (log_softmax row by row in place: each row is read before it is written), for a caller
    that owns the logits and never reads them again. At N = 2048, V = 8192 on CPU this saves three
    (N, V) allocations, roughly 5% of a training step (benchmarks/bench_train_step.py's shape).
    Like F.cross_entropy it computes in the logits' dtype: upcast them first for a bf16 model.

    Backward spends the buffer, so it runs once (autograd's version check refuses a second pass).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, consume: bool) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1, out=logits if consume else None)
        ctx.save_for_backward(logp, targets)
        return -logp.gather(1, targets[:, None]).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logp, targets = ctx.saved_tensors
        dlogits = logp.exp_()  # softmax
        dlogits.scatter_add_(1, targets[:, None], dlogits.new_full((targets.numel(), 1), -1.0))
        return dlogits.mul_(grad / targets.numel()), None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, consume: bool = False) -> torch.Tensor:
    """Mean cross-entropy of logits (N, V) against targets (N,), by ``CrossEntropy`` when differentiating.
    ``consume=True``: the logits may be overwritten (with log-probabilities); the caller must not use them again."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return CrossEntropy.apply(logits, targets, consume and not logits.is_leaf)
    return torch.nn.functional.cross_entropy(logits, targets)


def next_token_loss(model: torch.nn.Module, window: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy (fp32) of predicting ``window[:, 1:]`` from ``window[:, :-1]``.

    window: (B, T+1) token ids; ``doc_ids`` (B, T), the document of each input token, keeps attention
    inside documents (``data.document_mask``). The model returns the summed loss of the B*T targets
    (fused with its output projection, in chunks); this divides by their number.
    """
    inputs, targets = window[:, :-1], window[:, 1:]  # (B, T), (B, T)
    return model(inputs, doc_ids=doc_ids, labels=targets) / targets.numel()
