"""``train.compile``: each transformer block compiles into one graph with no graph break, and the
compiled model (per block, as ``distributed.parallelize`` compiles it) trains like the eager one.

Under torch.compile the kernels take plain tensor ops (``torch.compiler.is_compiling()``): the eager
kernels' ``out=`` writes into strided views are graph breaks (a block fell into 13 graphs).
Inductor builds C++ kernels on CPU: a cold compile of this tiny model takes about 20-60 s here,
a warm one (the kernels cached under /tmp/torchinductor_$USER) a few seconds.
"""

import pytest
import torch

from distllm.config import ModelConfig
from distllm.data.packing import document_attention_mask
from distllm.model import Transformer


def build(seed: int = 0, **kw) -> Transformer:
    base = dict(vocab_size=128, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, max_seq_len=32, init_std=0.1)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**base, **kw}))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["train", "eval", "eval with document mask"])
def test_a_block_is_one_graph_without_breaks(mode):
    model = build()
    block = model.layers[0].train(mode == "train")
    x = torch.randn(2, 16, 64, requires_grad=mode == "train")
    cos, sin = model.rope.tables(0, 16)
    mask = document_attention_mask(torch.tensor([[0] * 5 + [1] * 11, [0] * 16])) if "mask" in mode else None
    with torch.set_grad_enabled(mode == "train"):
        explained = torch._dynamo.explain(block)(x, cos, sin, None, 0, mask)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_the_whole_eval_forward_is_one_graph():
    model = build().eval()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(torch.randint(0, 128, (2, 16)))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_fullgraph_compiled_blocks_train_like_eager():
    """Loss (the fused chunked loss of ``model(x, labels=...)``) and every gradient of the model with its
    blocks compiled with ``fullgraph=True`` (an error on any graph break) equal eager within 1e-5, and
    so do the eval logits."""
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    results = []
    for compiled in (False, True):
        model = build().train()
        if compiled:
            for block in model.layers:
                block.compile(fullgraph=True)
        loss = model(inputs, labels=labels)
        loss.backward()
        with torch.no_grad():
            logits = model.eval()(inputs)
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, logits))
    (loss_e, grads_e, logits_e), (loss_c, grads_c, logits_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-5, atol=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-5, msg=name)
