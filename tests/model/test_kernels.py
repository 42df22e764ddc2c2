"""Kernel choices of distllm/model/kernels.py: which RMSNorm backward runs, and how grouped-query
k/v reach SDPA (enable_gqa or repeated k/v), both paths numerically equal."""

import pytest
import torch
import torch.nn.functional as F

from distllm.config import ModelConfig
from distllm.model import Transformer, kernels
from distllm.model.kernels import attention, has_fused_rms_norm_backward, repeat_kv, rms_norm, use_enable_gqa

# ---------------------------------------------------------------- RMSNorm: chosen by capability


def test_cpu_has_no_fused_rms_norm_backward_so_the_hand_written_one_runs():
    assert has_fused_rms_norm_backward("cpu") is False  # no torch build has a CPU kernel for it
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    assert "RMSNormFunction" in type(rms_norm(x, w, 1e-5).grad_fn).__name__
    with torch.no_grad():  # inference: torch's own kernel, nothing to differentiate
        torch.testing.assert_close(rms_norm(x, w, 1e-5), F.rms_norm(x, (8,), w, 1e-5))


def test_rms_norm_uses_torch_where_torch_has_a_fused_backward(monkeypatch):
    monkeypatch.setitem(kernels._fused_backward_cache, "cpu", True)  # pretend this build had one
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    assert "RMSNormFunction" not in type(rms_norm(x, w, 1e-5).grad_fn).__name__


@pytest.mark.gpu
def test_cuda_fused_rms_norm_backward_from_torch_2_9():
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    assert has_fused_rms_norm_backward("cuda") == ((major, minor) >= (2, 9))


# ---------------------------------------------------------------- SDPA with grouped-query attention

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    "device, dtype, masked, head_dim, flash_capable, expected",
    [
        ("cpu", FP32, False, 64, False, True),  # measured: enable_gqa ~15% faster than repeating on CPU
        ("cpu", FP32, True, 64, False, True),  # the CPU flash kernel takes GQA with a mask too
        ("cpu", BF16, False, 64, False, True),
        ("cuda", BF16, False, 128, True, True),  # training on Ampere+: flash with enable_gqa
        ("cuda", FP16, False, 256, True, True),
        ("cuda", FP32, False, 128, True, False),  # flash has no fp32: repeat, memory-efficient kernel
        ("cuda", BF16, True, 128, True, False),  # masked KV-cache prefill: flash takes no mask
        ("cuda", BF16, False, 128, False, False),  # pre-Ampere GPU (or flash switched off)
        ("cuda", BF16, False, 512, True, False),  # head_dim beyond flash's 256
        ("mps", FP32, False, 64, False, False),  # elsewhere: plain multi-head attention runs on every backend
    ],
)
def test_gqa_decision_table(device, dtype, masked, head_dim, flash_capable, expected):
    assert use_enable_gqa(device, dtype, masked, head_dim, flash_capable) is expected


def test_repeat_kv_is_repeat_interleave():
    x = torch.randn(2, 3, 5, 4)
    assert torch.equal(repeat_kv(x, 4), x.repeat_interleave(4, dim=1))


def reference_attention(q, k, v, mask):
    """Explicit softmax attention with repeated k/v heads; mask (T, S) bool, True = attend."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


CASES = {  # name: (T, S, kind) with kind the way attention() is called
    "causal training": (12, 12, "causal"),
    "masked prefill after a prefix": (5, 13, "mask"),
    "decode one token": (1, 9, "none"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_both_gqa_paths_equal_forward_and_backward(monkeypatch, case, n_kv_heads):
    T, S, kind = CASES[case]
    g = torch.Generator().manual_seed(0)
    q0 = torch.randn(2, 4, T, 16, generator=g, dtype=torch.float64)
    k0 = torch.randn(2, n_kv_heads, S, 16, generator=g, dtype=torch.float64)
    v0 = torch.randn(2, n_kv_heads, S, 16, generator=g, dtype=torch.float64)
    dy = torch.randn(2, 4, T, 16, generator=g, dtype=torch.float64)
    full = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # query i sits at position S - T + i
    mask = full if kind == "mask" else None
    results = []
    for gqa in (True, False, None):  # enable_gqa, repeated k/v, explicit reference
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        if gqa is None:
            y = reference_attention(q, k, v, full)
        else:
            monkeypatch.setattr(kernels, "use_enable_gqa", lambda *args, gqa=gqa: gqa)
            y = attention(q, k, v, attn_mask=mask, is_causal=kind == "causal")
        y.backward(dy)
        results.append((y.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(results[0], results[2]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("gqa", [True, False])
def test_kv_cache_chunked_prefill_matches_full_forward_on_both_paths(monkeypatch, gqa):
    monkeypatch.setattr(kernels, "use_enable_gqa", lambda *args: gqa)
    cfg = ModelConfig(vocab_size=128, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, max_seq_len=32, init_std=0.1)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_kv_cache(2, 20)
        parts = [model(tokens[:, :8], cache=cache, start_pos=0)]  # prefill: causal
        parts += [model(tokens[:, 8:13], cache=cache, start_pos=8)]  # chunk after a prefix: masked
        parts += [model(tokens[:, t : t + 1], cache=cache, start_pos=t) for t in range(13, 20)]  # decode
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, FP32])
@pytest.mark.parametrize("masked", [False, True])
def test_gqa_decision_matches_what_torch_can_run_on_this_gpu(dtype, masked):
    """enable_gqa is chosen exactly where torch's flash kernel accepts it; elsewhere the repeated k/v
    run on the memory-efficient kernel, never on the O(T^2) math kernel."""
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

    q = torch.randn(2, 8, 64, 64, device="cuda", dtype=dtype)
    k = v = torch.randn(2, 2, 64, 64, device="cuda", dtype=dtype)
    mask = torch.ones(64, 64, dtype=torch.bool, device="cuda").tril() if masked else None
    gqa = use_enable_gqa("cuda", dtype, masked, 64, kernels.cuda_flash_capable(0))
    if gqa:
        assert can_use_flash_attention(SDPAParams(q, k, v, mask, 0.0, not masked, True), True)
    else:
        kr, vr = repeat_kv(k, 4), repeat_kv(v, 4)
        assert can_use_efficient_attention(SDPAParams(q, kr, vr, mask, 0.0, not masked, False), True)
