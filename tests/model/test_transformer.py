import math

import pytest
import torch
import torch.nn.functional as F

from distllm.config import ModelConfig
from distllm.model import Transformer
from distllm.model.kernels import QKVRoPEFunction, RMSNormFunction, SwiGLUFunction, apply_rope, rope_tables
from distllm.model.transformer import RMSNorm


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=128, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def build(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**kw))


def test_output_shape_and_config_build():
    cfg = tiny()
    model = Transformer(cfg)
    assert isinstance(model, Transformer)
    tokens = torch.randint(0, cfg.vocab_size, (3, 10))
    assert model(tokens).shape == (3, 10, cfg.vocab_size)


def test_parameter_names():
    names = {n for n, _ in build(tie_embeddings=False).named_parameters()}
    assert names == {
        "tok_emb.weight",
        "norm.weight",
        "lm_head.weight",
        *(
            f"layers.{i}.{p}.weight"
            for i in range(2)
            for p in ("attn_norm", "attn.wqkv", "attn.wo", "mlp_norm", "mlp.w_gate_up", "mlp.w_down")
        ),
    }


def test_causal_masking():
    model = build().eval()
    tokens = torch.randint(0, 128, (2, 16))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 128
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_rmsnorm_matches_torch_and_its_gradients():
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 16, requires_grad=True)
    dy = torch.randn(3, 7, 16)
    ours = norm(x)
    ours.backward(dy)
    grads = x.grad, norm.weight.grad
    x.grad = norm.weight.grad = None
    ref = F.rms_norm(x, (16,), norm.weight, 1e-5)
    ref.backward(dy)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], norm.weight.grad)


def test_rope_depends_only_on_relative_position():
    hd = 16
    cos, sin = rope_tables(hd, 64, 10000.0)
    q, k = torch.randn(hd), torch.randn(hd)
    rq = apply_rope(q.expand(1, 64, 1, hd), cos, sin)[0, :, 0]  # (64, hd): q rotated to every position
    rk = apply_rope(k.expand(1, 64, 1, hd), cos, sin)[0, :, 0]

    def score(m, n):
        return rq[m] @ rk[n]

    for m, n, s in [(5, 2, 7), (0, 0, 40), (3, 9, 20), (10, 10, 1)]:
        torch.testing.assert_close(score(m, n), score(m + s, n + s), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)  # the offset does matter
    torch.testing.assert_close(rq[0], q)  # position 0 is the identity


def test_rope_uses_hf_rotate_half_convention():
    hd, T = 8, 6
    cos, sin = rope_tables(hd, T, 500.0)
    x = torch.randn(2, T, 3, hd)
    inv_freq = 1.0 / 500.0 ** (torch.arange(0, hd, 2).float() / hd)
    emb = torch.cat([torch.outer(torch.arange(T).float(), inv_freq)] * 2, dim=-1)[:, None]  # (T, 1, hd)
    rotate_half = torch.cat((-x[..., hd // 2 :], x[..., : hd // 2]), dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), x * emb.cos() + rotate_half * emb.sin())


def test_rope_tables_stay_fp32_after_dtype_cast_and_meta_init():
    model = build().to(torch.float64)
    assert model.rope.cos.dtype == torch.float32 and model.tok_emb.weight.dtype == torch.float64
    torch.testing.assert_close(model.rope.sin, rope_tables(16, 32, 10000.0)[1])
    assert "rope.cos" not in model.state_dict()
    with torch.device("meta"):
        model = Transformer(tiny())
    model.to_empty(device="cpu")  # buffers are rebuilt, not left uninitialised
    torch.testing.assert_close(model.rope.cos, rope_tables(16, 32, 10000.0)[0])


def reference_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """The model's math in plain autograd ops: HF's RoPE formula, explicit softmax attention with k/v
    heads repeated for GQA, torch's rms_norm, silu(gate) * up; none of the model's hand-written backwards."""
    cfg = model.cfg
    B, T = tokens.shape
    nh, nkv, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    cos, sin = model.rope.cos[:T], model.rope.sin[:T]

    def norm(x, module):
        return F.rms_norm(x, (cfg.d_model,), module.weight, cfg.norm_eps)

    def rope(x):  # HF's formula: x cos + rotate_half(x) sin, with sin = [sin, sin]
        rotate_half = torch.cat((-x[..., hd // 2 :], x[..., : hd // 2]), dim=-1)
        return x * cos[:, None] + rotate_half * sin[:, None, hd // 2 :].repeat(1, 1, 2)

    x = model.tok_emb(tokens)
    for layer in model.layers:
        h = norm(x, layer.attn_norm)
        q, k, v = layer.attn.wqkv(h).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = rope(q.view(B, T, nh, hd)).transpose(1, 2)
        k = rope(k.view(B, T, nkv, hd)).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
        v = v.view(B, T, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + layer.attn.wo((att @ v).transpose(1, 2).reshape(B, T, nh * hd))
        gate, up = layer.mlp.w_gate_up(norm(x, layer.mlp_norm)).chunk(2, dim=-1)
        x = x + layer.mlp.w_down(F.silu(gate) * up)
    return model.lm_head(norm(x, model.norm))


def test_gradients_match_plain_autograd_reference():
    model = build(init_std=0.1).train()
    tokens = torch.randint(0, 128, (2, 13))
    grads = []
    for forward in (model, lambda t: reference_forward(model, t)):
        model.zero_grad()
        F.cross_entropy(forward(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_hand_written_backwards_pass_gradcheck():
    cos, sin = (t.double() for t in rope_tables(8, 5, 100.0))
    qkv = torch.randn(2, 5, 4 + 2 * 2, 8, dtype=torch.float64, requires_grad=True)  # 4 query heads, 2 kv heads
    assert torch.autograd.gradcheck(lambda qkv: QKVRoPEFunction.apply(qkv, cos, sin, 4, 2), (qkv,))
    # SwiGLU's backward spends its saved buffer (gradcheck needs repeated backwards): one backward
    # against plain autograd instead, and a second backward must be refused
    gate_up = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 5, 6, dtype=torch.float64)
    gate, up = gate_up.chunk(2, dim=-1)
    (expected,) = torch.autograd.grad(F.silu(gate) * up, gate_up, dy)
    y = SwiGLUFunction.apply(gate_up * 1.0)  # a non-leaf input, as in the model
    torch.testing.assert_close(y, F.silu(gate) * up)
    (got,) = torch.autograd.grad(y, gate_up, dy, retain_graph=True)
    torch.testing.assert_close(got, expected)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y, gate_up, dy)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.rand(8, dtype=torch.float64).add(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-5), (x, w))


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_attention_matches_explicit_multi_head_reference(n_kv_heads):
    model = build(n_kv_heads=n_kv_heads, init_std=0.1).eval()
    tokens = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference_forward(model, tokens), rtol=1e-4, atol=1e-5)


def test_gqa_equals_multi_head_with_repeated_kv_weights():
    gqa = build(n_kv_heads=2, init_std=0.1).eval()
    mha = build(n_kv_heads=4).eval()
    hd, groups = 16, 2
    with torch.no_grad():
        for src, dst in zip(gqa.layers, mha.layers):
            q, k, v = src.attn.wqkv.weight.split([4 * hd, 2 * hd, 2 * hd])
            rep = lambda w: w.view(2, hd, -1).repeat_interleave(groups, dim=0).reshape(4 * hd, -1)  # noqa: E731
            dst.attn.wqkv.weight.copy_(torch.cat([q, rep(k), rep(v)]))
        for (n, p), (_, p2) in zip(gqa.named_parameters(), mha.named_parameters()):
            if "wqkv" not in n:
                p2.copy_(p)
        tokens = torch.randint(0, 128, (2, 12))
        torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-4, atol=1e-5)


def test_tied_embeddings_share_storage():
    tied = build(tie_embeddings=True)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = build(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.tok_emb.weight)


def test_init_std():
    cfg = tiny(d_model=128, n_heads=4, n_layers=4, vocab_size=512, init_std=0.05, tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg)
    out_std = 0.05 / math.sqrt(2 * 4)

    def close(t, std):
        return abs(t.std().item() - std) < 0.05 * std and abs(t.mean().item()) < 0.05 * std

    assert close(model.tok_emb.weight, 0.05) and close(model.lm_head.weight, 0.05)
    for layer in model.layers:
        assert close(layer.attn.wqkv.weight, 0.05) and close(layer.mlp.w_gate_up.weight, 0.05)
        assert close(layer.attn.wo.weight, out_std) and close(layer.mlp.w_down.weight, out_std)
        assert torch.equal(layer.attn_norm.weight, torch.ones(128))
        assert torch.equal(layer.mlp_norm.weight, torch.ones(128))
    assert torch.equal(model.norm.weight, torch.ones(128))


def test_activation_checkpointing_same_loss_and_grads():
    tokens = torch.randint(0, 128, (2, 17))
    results = []
    for flag in (False, True):
        model = build(init_std=0.1).train()
        model.activation_checkpointing = flag
        calls = []
        model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)))
    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = results
    assert (calls_a, calls_b) == (1, 2)  # checkpointing re-runs the block in backward
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_max_seq_len_overflow_raises():
    model = build()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    model(torch.zeros(1, 32, dtype=torch.long))
    cache = model.new_kv_cache(1)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache, start_pos=31)
