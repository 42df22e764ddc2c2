"""The pretraining objective: next-token cross-entropy on a window of T+1 tokens."""

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
    """Mean cross-entropy of predicting ``window[:, 1:]`` from ``window[:, :-1]``.

    window: (B, T+1) token ids. Logits are upcast to fp32 for the softmax. ``doc_ids`` (B, T), the
    document of each input token, keeps attention inside documents (``data.document_mask``).
    """
    inputs, targets = window[:, :-1], window[:, 1:]  # (B, T), (B, T)
    if doc_ids is None:
        logits = model(inputs)  # (B, T, V), used only here
    else:
        from distllm.data.packing import document_attention_mask

        logits = model(inputs, attn_mask=document_attention_mask(doc_ids))  # (B, 1, T, T) mask
    # Overwriting the logits saves a page-faulting (N, V) allocation on CPU; on GPUs the caching
    # allocator makes it cheap (and bf16 logits are upcast into a new tensor anyway).
    consume = logits.device.type == "cpu"
    return cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), consume=consume)
