"""data.document_mask: attention stays inside each packed document, end to end."""

import torch

from distllm.config import ModelConfig
from distllm.data.packing import document_attention_mask
from distllm.model import Transformer
from distllm.train import train


def test_a_document_never_sees_the_one_before_it():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, max_seq_len=16)).eval()
    tokens = torch.randint(0, 64, (1, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])  # document 1 starts at position 5
    other = tokens.clone()
    other[0, :5] = torch.randint(0, 64, (5,))  # change only the first document
    mask = document_attention_mask(doc_ids)
    with torch.no_grad():
        a, b = model(tokens, attn_mask=mask), model(other, attn_mask=mask)
        c, d = model(tokens), model(other)
    assert torch.allclose(a[0, 5:], b[0, 5:], atol=1e-6)  # the second document does not see the first
    assert not torch.allclose(c[0, 5:], d[0, 5:], atol=1e-3)  # without the mask it does
    single = torch.zeros_like(doc_ids)  # one document: the mask is the causal mask
    with torch.no_grad():
        assert torch.allclose(model(tokens, attn_mask=document_attention_mask(single)), c, atol=1e-5)


def test_training_with_document_masking(tiny_config):
    tiny_config.data.document_mask = True
    tiny_config.train.max_steps, tiny_config.train.eval_every = 6, 0
    result = train(tiny_config)
    assert result.step == 6 and result.loss < 6.3
