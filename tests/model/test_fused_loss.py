"""The cross-entropy fused with the output projection (distllm/model/fused_loss.py): ``model(x, labels=y)``
equals the unfused path (logits, then ``distllm.loss.cross_entropy``) in value and gradients, in chunks
of tokens, and never allocates a (tokens x vocab) tensor."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from distllm.config import ModelConfig
from distllm.loss import cross_entropy
from distllm.model import Transformer
from distllm.model import fused_loss
from distllm.model.fused_loss import IGNORE_INDEX, linear_cross_entropy


def build(tie: bool = True, seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab_size=96, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, max_seq_len=32, init_std=0.2,
                      tie_embeddings=tie)
    torch.manual_seed(seed)
    return Transformer(cfg)


def loss_and_grads(model, fn):
    model.zero_grad()
    loss = fn()
    (loss * 0.37).backward()  # a non-unit upstream gradient reaches the chunks' saved gradients
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_and_gradients_equal_the_unfused_path(tie):
    model = build(tie)
    model.lm_head.chunk_tokens = 5  # 26 tokens: chunks of 5, 5, 5, 5, 5, 1
    tokens = torch.randint(0, 96, (2, 14), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    n = targets.numel()
    ref_loss, ref_grads = loss_and_grads(model, lambda: cross_entropy(model(inputs).flatten(0, 1), targets.flatten()) * n)
    loss, grads = loss_and_grads(model, lambda: model(inputs, labels=targets))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_ignored_labels_add_nothing_to_loss_or_gradients():
    model = build()
    model.lm_head.chunk_tokens = 4
    tokens = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(2))
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[0, :6] = IGNORE_INDEX  # a prompt: a whole chunk and part of the next
    targets[1, 9] = IGNORE_INDEX
    ref_loss, ref_grads = loss_and_grads(model, lambda: F.cross_entropy(
        model(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
    loss, grads = loss_and_grads(model, lambda: model(inputs, labels=targets))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    nothing = torch.full_like(targets, IGNORE_INDEX)
    assert model(inputs, labels=nothing).item() == 0.0


def test_chunk_size_does_not_change_the_result():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(40, 16, generator=g, dtype=torch.float64), torch.randn(50, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 50, (40,), generator=g)
    results = []
    for chunk in (None, 1, 7, 40, 1000):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = linear_cross_entropy(h, w, labels, chunk)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    ref = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    for loss, dh, dw in results:
        torch.testing.assert_close(loss, ref.float())  # fp32 sum whatever the inputs' dtype
        torch.testing.assert_close(dh, results[0][1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dw, results[0][2], rtol=1e-12, atol=1e-12)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op allocates (views and in-place results,
    whose storage is one of the op's inputs', are not allocations)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def test_the_tokens_x_vocab_logits_never_exist():
    N, d, V, chunk = 128, 32, 512, 16
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(N, d, generator=g, requires_grad=True)
    weight = torch.randn(V, d, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    with LargestTensor() as fused:
        linear_cross_entropy(hidden, weight, labels, chunk).backward()
    assert fused.largest == max(chunk * V, V * d)  # one chunk's logits, or the weight's gradient
    with LargestTensor() as unfused:
        cross_entropy(hidden @ weight.T, labels).backward()
    assert unfused.largest == N * V  # what the fused path avoids


def test_backward_runs_once_and_no_grad_computes_only_the_loss():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(12, 8, generator=g, requires_grad=True)
    weight = torch.randn(20, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 20, (12,), generator=g)
    loss = linear_cross_entropy(hidden, weight, labels, 5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the saved gradients were scaled in place
    with torch.no_grad(), LargestTensor() as mode:
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, 5), loss.detach())
    assert mode.largest == 5 * 20  # no gradient buffers: nothing larger than a chunk's logits


def test_bf16_autocast_accumulates_the_weight_gradient_in_fp32():
    """Under bf16 autocast (DDP bf16) the matmuls run in bf16 and each chunk's share of d weight is
    summed in fp32: over 16 chunks its error against an fp64 reference stays that of the unfused bf16
    path (one bf16 product); a running sum in bf16 would round 16 times."""
    N, d, V = 512, 64, 256
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(N, d, generator=g)
    weight = torch.randn(V, d, generator=g) * 0.3
    labels = torch.randint(0, V, (N,), generator=g)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    F.cross_entropy(h64 @ w64.T, labels, reduction="sum").backward()

    def error(grad, ref):
        return ((grad.double() - ref).norm() / ref.norm()).item()

    results = {}
    for name in ("unfused", "fused"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if name == "fused":
                loss = linear_cross_entropy(h, w, labels, N // 16)
            else:
                loss = F.cross_entropy((h @ w.T).float(), labels, reduction="sum")
        loss.backward()
        assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
        results[name] = (loss.item(), error(h.grad, h64.grad), error(w.grad, w64.grad))
    (loss_u, dh_u, dw_u), (loss_f, dh_f, dw_f) = results["unfused"], results["fused"]
    assert abs(loss_f - loss_u) < 1e-3 * abs(loss_u)
    assert dh_f < 1.1 * dh_u + 1e-4, results
    assert dw_f < 1.1 * dw_u + 1e-4, results


def test_bf16_weights_get_bf16_gradients():
    """ZeRO bf16 (bf16 parameters, no autocast): gradients come back in the parameters' dtype."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(16, 8, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(24, 8, generator=g).bfloat16().requires_grad_()
    labels = torch.randint(0, 24, (16,), generator=g)
    loss = linear_cross_entropy(hidden, weight, labels, 6)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    ref = F.cross_entropy((hidden.float() @ weight.float().T), labels, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=1e-2)


def test_default_chunks():
    assert fused_loss.default_chunk_tokens(100) == fused_loss.MIN_CHUNK_TOKENS
    assert fused_loss.default_chunk_tokens(8 * 2048) == 2048  # llama-1b's micro-batch: 8 chunks


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_on_cuda_matches_the_unfused_path(dtype):
    """On the GPU (fp32, and bf16 autocast where the fp32-output addmm may run): loss and gradients
    against the unfused path in fp32."""
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(4096, 256, generator=g).cuda()
    weight = (torch.randn(8192, 256, generator=g) * 0.1).cuda()
    labels = torch.randint(0, 8192, (4096,), generator=g).cuda()
    labels[:100] = IGNORE_INDEX
    h32, w32 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.backends.cuda.matmul.sdp_kernel() if False else torch.autocast("cuda", enabled=False):
        ref = F.cross_entropy(h32.double() @ w32.double().T, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = linear_cross_entropy(h, w, labels, 512)
    loss.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol)
    for got, want in ((h.grad, h32.grad), (w.grad, w32.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() < (1e-4 if dtype == torch.float32 else 1e-2)
