import pytest
import torch
import torch.nn.functional as F

from distllm.loss import cross_entropy, next_token_loss


def test_cross_entropy_value_and_gradient_match_torch():
    torch.manual_seed(0)
    logits = torch.randn(37, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (37,))
    ours = cross_entropy(logits, targets)
    (d_ours,) = torch.autograd.grad(ours * 3.0, logits)  # a non-unit upstream gradient
    ref = F.cross_entropy(logits, targets)
    (d_ref,) = torch.autograd.grad(ref * 3.0, logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(d_ours, d_ref)


def test_cross_entropy_backward_twice_is_refused():
    logits = torch.randn(4, 5, requires_grad=True)
    loss = cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_next_token_loss_predicts_the_shifted_window():
    """The mean over the window's B*T targets of the model's summed (fused, chunked) loss equals the
    cross-entropy of the model's logits against the shifted window."""
    from distllm.config import ModelConfig
    from distllm.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layers=1, n_heads=2, d_model=32, max_seq_len=16, init_std=0.2))
    model.lm_head.chunk_tokens = 7  # several chunks, the last one short
    window = torch.randint(0, 64, (3, 9))
    with torch.no_grad():
        expected = F.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
        torch.testing.assert_close(next_token_loss(model, window), expected)
    doc_ids = torch.tensor([[0] * 3 + [1] * 5] * 3)  # a document boundary: the model builds the mask
    from distllm.data.packing import document_attention_mask

    with torch.no_grad():
        masked = model(window[:, :-1], attn_mask=document_attention_mask(doc_ids))
        expected = F.cross_entropy(masked.flatten(0, 1), window[:, 1:].flatten())
        torch.testing.assert_close(next_token_loss(model, window, doc_ids), expected)


def test_consumed_logits_give_the_same_loss_and_gradients():
    torch.manual_seed(0)
    h = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 9, dtype=torch.float64)
    targets = torch.randint(0, 9, (6,))
    ref = F.cross_entropy(h @ w, targets)
    (d_ref,) = torch.autograd.grad(ref, h)
    logits = h @ w
    loss = cross_entropy(logits, targets, consume=True)
    torch.testing.assert_close(logits, torch.log_softmax(h.detach() @ w, -1))  # overwritten, as documented
    (d_ours,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(d_ours, d_ref)
