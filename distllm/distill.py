"""Distillation losses: pure functions of the student's logits, the teacher's logits (or its top-k
log-probabilities) and the labels, each returning a SUM over the counted positions (labels != -100)
for the loop to divide by the step's number of counted tokens.

Per counted position, with p the teacher's and q the student's distribution at temperature T
(``softmax(logits / T)``) and ``ce`` the student's cross-entropy at temperature 1 on the label::

    loss = alpha * T**2 * D(p, q) + (1 - alpha) * ce             (Hinton et al., 2015)

The T**2 keeps the soft-target gradient's magnitude independent of T (it shrinks as 1/T**2), for
every divergence D:

* ``forward_kl``: KL(p || q) = sum p (log p - log q)  (mass-covering; zero iff q = p)
* ``reverse_kl``: KL(q || p)  (mode-seeking)
* ``jsd``: generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024, eq. 1):
  ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q``. It tends
  to 0 at both ends, but ``JSD(beta) / beta -> KL(p || q)`` as beta -> 0 and ``JSD(beta) / (1 - beta)
  -> KL(q || p)`` as beta -> 1; so, as in TRL's GKDTrainer, beta = 0 means forward KL and beta = 1
  reverse KL (and 0.5 the symmetric JSD, at most log 2).

Top-k teacher (offline distillation): the teacher's top-k ids and log-probabilities (at the
distillation temperature, ``teacher_topk``) plus the log of the rest of its mass, the *tail*. Both
distributions are coarsened to k + 1 outcomes (the k tokens, and "any other token"), and D is taken
between the coarsened distributions. We prefer this to renormalizing the teacher over its top k:
it is an exact divergence (of the coarsened distributions, a lower bound of the full one by the data
processing inequality, equal to it when k = V or the teacher's tail mass is 0), and it does not
tell the student that every other token has probability zero (renormalizing inflates the top-k
mass by 1 / (1 - tail) and pushes the student's tail toward 0, i.e. overconfidence). The student's
tail is computed exactly (a log-sum-exp over the other tokens), never as 1 - sum. Without a stored
tail the teacher's is ``log(1 - sum(exp(topk_logprobs)))``.

Memory: the student's (N, V) logits are processed ``chunk_size`` counted positions at a time; under
autograd each chunk's gradient is computed during the forward pass into one (N, V) buffer (as
Liger's fused losses do), so no (N, V) fp32 intermediates are kept for backward. Each chunk is
computed in fp32 whatever the logits' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
CHUNK_ELEMENTS = 1 << 23
"""Default chunk: this many logits (32 MiB per fp32 copy), i.e. CHUNK_ELEMENTS // V positions."""


# --------------------------------------------------------------------------- divergences on rows


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of log-probabilities (n, C) -> (n,); terms where p = 0 count 0."""
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))  # no inf - inf where p = 0
    return (p * diff).sum(-1)


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """D(teacher, student) per row (n,) of log-probabilities (n, C) over the same outcomes (see the module doc)."""
    if kind == "forward_kl":
        return kl(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return kl(student_logp, teacher_logp)
    if kind != "jsd":
        raise ValueError(f"unknown divergence {kind!r}; use one of {', '.join(DIVERGENCES)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return kl(teacher_logp, student_logp)
    if beta == 1.0:
        return kl(student_logp, teacher_logp)
    mix = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))  # log m
    return beta * kl(teacher_logp, mix) + (1.0 - beta) * kl(student_logp, mix)


def _coarsened(student: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor,
               teacher_tail: torch.Tensor | None, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities over the k ids and the tail: (n, k + 1), or (n, k) when k = V."""
    s = student / temperature  # (n, V)
    log_z = torch.logsumexp(s, -1, keepdim=True)  # (n, 1)
    s_k = s.gather(-1, ids) - log_z  # (n, k)
    t_k = teacher_logp.float()
    if ids.size(-1) >= student.size(-1):  # no tail: every token is one of the k
        return s_k, t_k
    s_tail = torch.logsumexp(s.scatter(-1, ids, float("-inf")), -1, keepdim=True) - log_z  # (n, 1)
    if teacher_tail is None:
        rest = (1.0 - t_k.double().exp().sum(-1, keepdim=True)).clamp_min(0.0)
        t_tail = torch.where(rest > 0, rest.log(), torch.full_like(rest, float("-inf"))).float()
    else:
        t_tail = teacher_tail.float()[..., None]
    return torch.cat([s_k, s_tail], -1), torch.cat([t_k, t_tail], -1)


def _rows(student: torch.Tensor, labels: torch.Tensor, teacher: tuple, kind: str, alpha: float,
          temperature: float, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, divergence, ce) for fp32 student logits (n, V) and the teacher's rows."""
    if len(teacher) == 1:  # full logits
        s = F.log_softmax(student / temperature, -1)
        t = F.log_softmax(teacher[0].float() / temperature, -1)
    else:
        s, t = _coarsened(student, teacher[0], teacher[1], teacher[2] if len(teacher) > 2 else None, temperature)
    d = divergence(s, t, kind, beta)  # (n,)
    ce = torch.logsumexp(student, -1) - student.gather(-1, labels[:, None]).squeeze(-1)  # (n,)
    return alpha * temperature**2 * d + (1.0 - alpha) * ce, d, ce


def _forward_kl_rows_and_grad(s: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, alpha: float,
                              temperature: float):
    """``_rows`` for forward KL on full teacher logits with the gradient w.r.t. the student's fp32 logits
    s (n, V) in closed form, ``alpha * T * (q_T - p_T) + (1 - alpha) * (softmax(s) - onehot(label))`` (the
    T**2 of the loss times the 1/T of d(s/T)/ds), in few passes over (n, V), mostly in place (``s`` is
    consumed). With shifted logits a = t/T - max, b = s/T - max and p = softmax(a), q = softmax(b):
    KL(p || q) = sum p (a - b) - log sum exp(a) + log sum exp(b)."""
    T, inv = temperature, 1.0 / temperature
    a = t.float() * inv  # (n, V)
    a -= a.amax(-1, keepdim=True)
    p = a.exp()
    zp = p.sum(-1, keepdim=True)
    p /= zp  # p_T
    b = s * inv
    m = b.amax(-1, keepdim=True)
    b -= m
    a -= b  # a - b
    cross = torch.linalg.vecdot(p, a)  # sum p (a - b): (n,)
    q = b.exp_()
    zq = q.sum(-1, keepdim=True)
    q /= zq  # q_T
    d = cross - zp.log().squeeze(-1) + zq.log().squeeze(-1)  # (n,)
    if T == 1.0:
        soft, lse = q, (m + zq.log()).squeeze(-1)
    else:
        m1 = s.amax(-1, keepdim=True)
        soft = (s - m1).exp_()
        z1 = soft.sum(-1, keepdim=True)
        soft /= z1  # softmax(s)
        lse = (m1 + z1.log()).squeeze(-1)
    ce = lse - s.gather(-1, labels[:, None]).squeeze(-1)  # (n,)
    if soft is q:  # T = 1: alpha * (q - p) + (1 - alpha) * q
        grad = q.sub_(p, alpha=alpha)
    else:
        grad = q.sub_(p).mul_(alpha * T).add_(soft, alpha=1.0 - alpha)  # in place of q
    grad.scatter_add_(-1, labels[:, None], grad.new_full((labels.numel(), 1), -(1.0 - alpha)))
    return alpha * T * T * d + (1.0 - alpha) * ce, d, ce, grad


def _rows_and_grad(x: torch.Tensor, labels: torch.Tensor, teacher: tuple, kind: str, alpha: float,
                   temperature: float, beta: float):
    """(loss, divergence, ce) per row of fp32 student logits x (n, V), and d sum(loss) / dx (n, V) fp32."""
    if kind == "forward_kl" and len(teacher) == 1:
        return _forward_kl_rows_and_grad(x, labels, teacher[0], alpha, temperature)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, d, ce = _rows(x, labels, teacher, kind, alpha, temperature, beta)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), d.detach(), ce.detach(), grad


# --------------------------------------------------------------------------- chunked sum with its gradient


class _ChunkedSum(torch.autograd.Function):
    """Sum of ``rows_fn`` over chunks of rows; the gradient w.r.t. the logits is computed in forward."""

    @staticmethod
    def forward(ctx, logits, rows, chunk, rows_fn: Callable, *extras):
        grad = torch.zeros_like(logits)  # (N, V) in the logits' dtype
        sums = torch.zeros(3, dtype=torch.float32, device=logits.device)
        for a in range(0, rows.numel(), chunk):
            idx = rows[a : a + chunk]
            x = logits.index_select(0, idx).float()
            loss, d, ce, g = rows_fn(x, *[e.index_select(0, idx) for e in extras])
            grad.index_copy_(0, idx, g.to(grad.dtype))
            sums += torch.stack([loss.sum(), d.sum(), ce.sum()]).detach()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(sums)
        return sums[0].clone(), sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_sums):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype), None, None, None) + (None,) * (len(ctx.needs_input_grad) - 4)


def _targets(labels, N: int, V: int, teacher_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_topk_tail,
             kind: str, alpha: float, temperature: float, student_shape: tuple):
    """Checked arguments -> (labels (N,), the teacher's rows: (logits (N, V),) or (ids (N, k), logprobs (N, k)[, tail (N,)]))."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; use one of {', '.join(DIVERGENCES)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    flat_labels = labels.reshape(-1)  # (N,)
    if flat_labels.numel() != N:
        raise ValueError(f"labels {tuple(labels.shape)} do not match student logits {student_shape}")
    if teacher_logits is not None:
        if teacher_logits.numel() != N * V or teacher_logits.size(-1) != V:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} differ from the student's {student_shape} "
                             "(the same tokenizer and vocabulary rows are needed)")
        return flat_labels, (teacher_logits.reshape(-1, V).detach(),)
    if teacher_topk_ids is not None and teacher_topk_logprobs is not None:
        k = teacher_topk_ids.size(-1)
        teacher: tuple = (teacher_topk_ids.reshape(-1, k).long(), teacher_topk_logprobs.reshape(-1, k).detach())
        if teacher_topk_tail is not None:
            teacher += (teacher_topk_tail.reshape(-1).detach(),)
        return flat_labels, teacher
    raise ValueError("pass teacher_logits, or teacher_topk_ids with teacher_topk_logprobs")


def distill_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    teacher_topk_tail: torch.Tensor | None = None,
    kind: str = "forward_kl",
    alpha: float = 0.5,
    temperature: float = 2.0,
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``alpha * T**2 * D(teacher, student) + (1 - alpha) * CE`` summed over positions with labels != -100.

    student_logits (..., V) (e.g. (B, T, V)); labels (...) int64 aligned with them (-100 = not counted);
    either teacher_logits (..., V), or teacher_topk_ids (..., k) int64 with teacher_topk_logprobs
    (..., k) at temperature ``temperature`` and optionally teacher_topk_tail (...) (log of the rest of
    the mass). Returns (loss_sum, metrics) with metrics ``divergence_sum``, ``ce_sum`` (fp32 sums,
    detached) and ``tokens`` (the number of counted positions). Differentiable w.r.t. the student's
    logits only (the teacher's inputs are treated as constants).
    """
    V = student_logits.size(-1)
    logits = student_logits.reshape(-1, V)  # (N, V)
    flat_labels, teacher = _targets(labels, logits.size(0), V, teacher_logits, teacher_topk_ids, teacher_topk_logprobs,
                                    teacher_topk_tail, kind, alpha, temperature, tuple(student_logits.shape))
    rows = (flat_labels != IGNORE).nonzero().squeeze(-1)  # (n,) counted positions
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // V)

    def rows_fn(x, y, *t):
        return _rows_and_grad(x, y, t, kind, alpha, temperature, beta)

    extras = (flat_labels,) + teacher
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, sums = _ChunkedSum.apply(logits, rows, chunk, rows_fn, *extras)
    else:
        sums = torch.zeros(3, dtype=torch.float32, device=logits.device)
        for a in range(0, rows.numel(), chunk):
            idx = rows[a : a + chunk]
            parts = _rows(logits.index_select(0, idx).float(), *[e.index_select(0, idx) for e in extras][:1],
                          tuple(e.index_select(0, idx) for e in extras[1:]), kind, alpha, temperature, beta)
            sums += torch.stack([p.sum() for p in parts])
        loss = sums[0]
    return loss, {"divergence_sum": sums[1], "ce_sum": sums[2], "tokens": rows.numel()}


class _LinearChunkedSum(torch.autograd.Function):
    """``_ChunkedSum`` fused with the output projection: the student's logits ``hidden @ weight.T`` are made
    one chunk of rows at a time and dropped; the gradients w.r.t. hidden and weight are computed in forward
    (as ``model/fused_loss.py`` does for the cross-entropy), so no (N, V) tensor of the student exists."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, chunk, rows_fn: Callable, *extras):
        from distllm.model.fused_loss import compute_dtype

        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = compute_dtype(hidden, weight)
        acc = torch.promote_types(dtype, torch.float32)
        dh = torch.zeros_like(hidden) if want_dh else None  # (N, d)
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_dw else None  # (V, d)
        sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # (V, d)
            for a in range(0, rows.numel(), chunk):
                idx = rows[a : a + chunk]
                h = hidden.index_select(0, idx).to(dtype)  # (C, d)
                loss, d, ce, g = rows_fn((h @ w.T).float(), *[e.index_select(0, idx) for e in extras])  # g (C, V)
                sums += torch.stack([loss.sum(), d.sum(), ce.sum()])
                g = g.to(dtype)
                if want_dh:
                    dh.index_copy_(0, idx, (g @ w).to(dh.dtype))  # (C, d)
                if want_dw:
                    if dtype == acc:
                        dw.addmm_(g.T, h)  # (V, d) += (V, C) @ (C, d)
                    else:
                        dw += g.T @ h  # a bf16 product summed in fp32
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(dh, dw)
        ctx.mark_non_differentiable(sums)
        return sums[0].clone(), sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_sums):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh.mul_(grad_loss.to(dh.dtype))
        dw = None if dw is None else dw.mul_(grad_loss).to(ctx.weight_dtype)
        return (dh, dw, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 5)


def linear_distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    teacher_topk_tail: torch.Tensor | None = None,
    kind: str = "forward_kl",
    alpha: float = 0.5,
    temperature: float = 2.0,
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``distill_loss`` of the student logits ``hidden @ weight.T`` without making them: hidden (N, d), weight
    (V, d) (the output projection), labels (N,) or any shape of N elements, the teacher's tensors as in
    ``distill_loss`` with N rows. Differentiable w.r.t. hidden and weight; the same value and metrics."""
    N, V = hidden.size(0), weight.size(0)
    flat_labels, teacher = _targets(labels, N, V, teacher_logits, teacher_topk_ids, teacher_topk_logprobs,
                                    teacher_topk_tail, kind, alpha, temperature, (N, V))
    rows = (flat_labels != IGNORE).nonzero().squeeze(-1)  # (n,) counted positions
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // V)
    extras = (flat_labels,) + teacher

    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        def rows_fn(x, y, *t):
            return _rows_and_grad(x, y, t, kind, alpha, temperature, beta)

        loss, sums = _LinearChunkedSum.apply(hidden, weight, rows, chunk, rows_fn, *extras)
    else:
        from distllm.model.fused_loss import compute_dtype

        dtype = compute_dtype(hidden, weight)
        sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for a in range(0, rows.numel(), chunk):
                idx = rows[a : a + chunk]
                x = (hidden.index_select(0, idx).to(dtype) @ w.T).float()
                parts = _rows(x, flat_labels.index_select(0, idx), tuple(e.index_select(0, idx) for e in teacher),
                              kind, alpha, temperature, beta)
                sums += torch.stack([p.sum() for p in parts])
        loss = sums[0]
    return loss, {"divergence_sum": sums[1], "ce_sum": sums[2], "tokens": rows.numel()}


# --------------------------------------------------------------------------- the teacher's side


def teacher_topk(logits: torch.Tensor, k: int, temperature: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What offline distillation stores for teacher logits (..., V): the top-k ids (..., k) int64 and
    log-probabilities (..., k) fp32 of ``softmax(logits / temperature)``, and the log of the rest of
    the mass (...) fp32 (-inf when k >= V), computed exactly."""
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got {k}")
    logp = F.log_softmax(logits.float() / temperature, -1)  # (..., V)
    k = min(k, logp.size(-1))
    values, ids = logp.topk(k, -1)  # (..., k), sorted descending
    tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), -1)  # (...,)
    return ids, values, tail
