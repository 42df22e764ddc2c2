"""Distillation losses against straightforward float64 computations (torch.distributions for the KLs),
their limits (zero for equal distributions, JSD's beta edges, T**2 scaling), the top-k variant, and
chunking."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from distllm.distill import DIVERGENCES, distill_loss, linear_distill_loss, teacher_topk

V = 50


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only waits for its share on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def data(seed=0, B=3, T=7, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * scale
    teacher = torch.randn(B, T, V, generator=g) * scale
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    labels[-1, -1] = -100
    return student, teacher, labels


def reference(student, teacher, labels, kind, alpha, T, beta=0.5):
    """Loss sum in float64 with torch.distributions, no chunking."""
    keep = labels != -100
    s, t, y = student.double()[keep], teacher.double()[keep], labels[keep]
    q, p = Categorical(logits=s / T), Categorical(logits=t / T)
    if kind == "forward_kl":
        d = kl_divergence(p, q)
    elif kind == "reverse_kl":
        d = kl_divergence(q, p)
    else:
        m = Categorical(probs=beta * p.probs + (1 - beta) * q.probs)
        d = beta * kl_divergence(p, m) + (1 - beta) * kl_divergence(q, m)
    ce = F.cross_entropy(s, y, reduction="none")
    return (alpha * T * T * d + (1 - alpha) * ce).sum(), d.sum(), ce.sum()


def coarsened_reference(student, teacher, ids, labels, kind, alpha, T):
    """The top-k loss sum in float64: both distributions over the k ids plus "the rest" (1 - their sum)."""
    keep = labels != -100
    s, t, i, y = student[keep], teacher[keep], ids[keep], labels[keep]
    q, p = (F.softmax(z / T, -1).gather(-1, i) for z in (s, t))
    q, p = (torch.cat([z, 1 - z.sum(-1, keepdim=True)], -1) for z in (q, p))
    P, Q = Categorical(probs=p), Categorical(probs=q)
    d = {"forward_kl": lambda: kl_divergence(P, Q), "reverse_kl": lambda: kl_divergence(Q, P),
         "jsd": lambda: 0.5 * kl_divergence(P, Categorical(probs=(p + q) / 2))
         + 0.5 * kl_divergence(Q, Categorical(probs=(p + q) / 2))}[kind]()
    return (alpha * T * T * d + (1 - alpha) * F.cross_entropy(s, y, reduction="none")).sum()


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("alpha, T, beta", [(0.5, 2.0, 0.5), (1.0, 1.0, 0.1), (0.3, 4.0, 0.9), (0.6, 1.0, 0.5)])
def test_values_and_gradients_match_a_straightforward_computation(kind, alpha, T, beta):
    student, teacher, labels = data()
    x = student.clone().requires_grad_(True)
    loss, metrics = distill_loss(x, labels, teacher_logits=teacher, kind=kind, alpha=alpha, temperature=T,
                                 beta=beta, chunk_size=4)
    loss.backward()
    xr = student.double().requires_grad_(True)
    ref, d, ce = reference(xr, teacher, labels, kind, alpha, T, beta)
    ref.backward()
    assert metrics["tokens"] == int((labels != -100).sum()) == 17
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["divergence_sum"].double(), d.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["ce_sum"].double(), ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
    assert (x.grad[labels == -100] == 0).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_is_zero_for_the_teacher_itself(kind):
    student, _, labels = data(1)
    x = student.clone().requires_grad_(True)
    loss, metrics = distill_loss(x, labels, teacher_logits=student, kind=kind, alpha=1.0, temperature=2.0)
    loss.backward()
    assert abs(metrics["divergence_sum"].item()) < 1e-5 and abs(loss.item()) < 1e-4
    assert x.grad.abs().max() < 1e-6


def test_jsd_beta_edges_are_forward_and_reverse_kl():
    student, teacher, labels = data(2, scale=1.0)
    student, teacher = student * 0.5, teacher * 2.0  # a flatter student: forward and reverse KL differ

    def div(kind, beta=0.5):
        return distill_loss(student, labels, teacher_logits=teacher, kind=kind, alpha=1.0, temperature=1.0,
                            beta=beta)[1]["divergence_sum"].item()

    forward, reverse = div("forward_kl"), div("reverse_kl")
    assert div("jsd", 0.0) == pytest.approx(forward, rel=1e-6)
    assert div("jsd", 1.0) == pytest.approx(reverse, rel=1e-6)
    eps = 1e-3  # JSD(beta) / beta -> KL(p || q) as beta -> 0, JSD(beta) / (1 - beta) -> KL(q || p) as beta -> 1
    assert div("jsd", eps) / eps == pytest.approx(forward, rel=0.015)
    assert div("jsd", 1 - eps) / eps == pytest.approx(reverse, rel=0.015)
    assert reverse > 1.1 * forward
    n = int((labels != -100).sum())
    half = div("jsd", 0.5)
    assert 0 < half < n * math.log(2)  # the symmetric JSD is bounded by log 2 per position
    swapped = distill_loss(teacher, labels, teacher_logits=student, kind="jsd", alpha=1.0, temperature=1.0,
                           beta=0.5)[1]["divergence_sum"].item()
    assert swapped == pytest.approx(half, rel=1e-5)


def test_temperature_squared_keeps_the_gradient_magnitude():
    """Soft-target gradients shrink as 1/T**2; the T**2 factor makes them T-independent at large T."""
    student, teacher, labels = data(3, scale=1.0)

    def grads(T):
        x = student.clone().requires_grad_(True)
        loss, metrics = distill_loss(x, labels, teacher_logits=teacher, kind="forward_kl", alpha=1.0, temperature=T)
        assert loss.item() == pytest.approx(T * T * metrics["divergence_sum"].item(), rel=1e-6)
        loss.backward()
        return x.grad.norm().item()

    g25, g50 = grads(25.0), grads(50.0)
    assert g50 / g25 == pytest.approx(1.0, abs=0.03)  # without T**2 the ratio would be 1/4
    keep = labels != -100  # the large-T limit: the centred logit difference / V
    diff = (student - teacher)[keep]
    limit = ((diff - diff.mean(-1, keepdim=True)) / V).norm().item()
    assert g50 == pytest.approx(limit, rel=0.03)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_top_k_with_k_equal_to_the_vocabulary_is_the_full_loss(kind):
    student, teacher, labels = data(4)
    ids, logprobs, tail = teacher_topk(teacher, V, temperature=2.0)
    assert torch.isinf(tail).all()  # nothing left outside the top V
    results = []
    for teacher_args in ({"teacher_logits": teacher},
                         {"teacher_topk_ids": ids, "teacher_topk_logprobs": logprobs, "teacher_topk_tail": tail}):
        x = student.clone().requires_grad_(True)
        loss, _ = distill_loss(x, labels, kind=kind, temperature=2.0, **teacher_args)
        loss.backward()
        results.append((loss, x.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_top_k_with_a_tail_bucket(kind):
    student, teacher, labels = data(5)
    T, k = 2.0, 6
    ids, logprobs, tail = teacher_topk(teacher, k, temperature=T)
    # the stored tail is exactly the rest of the teacher's mass
    full = F.log_softmax(teacher.double() / T, -1)
    torch.testing.assert_close(logprobs.double(), full.gather(-1, ids), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tail.double(), torch.log1p(-full.gather(-1, ids).exp().sum(-1)), rtol=1e-5, atol=1e-6)

    x = student.clone().requires_grad_(True)
    loss, metrics = distill_loss(x, labels, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs,
                                 teacher_topk_tail=tail, kind=kind, alpha=0.7, temperature=T, chunk_size=5)
    loss.backward()
    xr = student.double().requires_grad_(True)
    ref = coarsened_reference(xr, teacher.double(), ids, labels, kind, 0.7, T)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
    full_loss = distill_loss(student, labels, teacher_logits=teacher, kind=kind, alpha=1.0, temperature=T)[1]
    assert metrics["divergence_sum"] < full_loss["divergence_sum"]  # coarsening loses information
    # without a stored tail it is 1 - sum(top-k)
    no_tail = distill_loss(student, labels, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs, kind=kind,
                           alpha=0.7, temperature=T)[0]
    torch.testing.assert_close(no_tail, loss.detach(), rtol=1e-5, atol=1e-5)


def test_chunking_and_no_grad_give_the_same_result():
    student, teacher, labels = data(6, B=2, T=33)
    results = []
    for chunk in (1, 7, None):
        x = student.clone().requires_grad_(True)
        loss, _ = distill_loss(x, labels, teacher_logits=teacher, kind="jsd", chunk_size=chunk)
        loss.backward()
        results.append((loss.detach(), x.grad))
    with torch.no_grad():
        results.append((distill_loss(student, labels, teacher_logits=teacher, kind="jsd")[0], results[0][1]))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-7)
    # bf16 logits: computed in fp32, gradient in bf16
    x = student.bfloat16().requires_grad_(True)
    loss, _ = distill_loss(x, labels, teacher_logits=teacher.bfloat16(), kind="forward_kl")
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    assert loss.item() == pytest.approx(distill_loss(x.float(), labels, teacher_logits=teacher.bfloat16().float(),
                                                     kind="forward_kl")[0].item(), rel=1e-5)


@pytest.mark.parametrize("teacher_kind", ["logits", "topk"])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_fused_with_the_output_projection_equals_the_loss_on_logits(kind, teacher_kind):
    """linear_distill_loss(hidden, weight) == distill_loss(hidden @ weight.T): value, parts and the gradients
    of hidden and weight (the chain rule through the projection), in chunks smaller than the rows."""
    g = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(3 * 7, 16, generator=g), torch.randn(V, 16, generator=g) * 0.5
    _, teacher, labels = data(8)
    target = ({"teacher_logits": teacher.reshape(-1, V)} if teacher_kind == "logits" else
              dict(zip(("teacher_topk_ids", "teacher_topk_logprobs", "teacher_topk_tail"),
                       (t.reshape(-1, *t.shape[2:]) for t in teacher_topk(teacher, 6, 2.0)))))
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss1, m1 = distill_loss(h1 @ w1.T, labels.reshape(-1), **target, kind=kind, alpha=0.3, temperature=2.0)
    loss1.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss2, m2 = linear_distill_loss(h2, w2, labels.reshape(-1), **target, kind=kind, alpha=0.3, temperature=2.0,
                                    chunk_size=4)
    loss2.backward()
    torch.testing.assert_close(loss2, loss1, rtol=1e-5, atol=1e-5)
    for key in ("divergence_sum", "ce_sum"):
        torch.testing.assert_close(m2[key], m1[key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)
    assert (h2.grad[labels.reshape(-1) == -100] == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(linear_distill_loss(hidden, weight, labels.reshape(-1), **target, kind=kind,
                                                       alpha=0.3, temperature=2.0)[0], loss1.detach(), rtol=1e-5,
                                   atol=1e-5)
