import pytest
import torch

from distllm.config import ModelConfig
from distllm.generate import generate, sample_next, top_k_filter, top_p_filter
from distllm.model import Transformer


def build(n_kv_heads=2, seed=0) -> Transformer:
    # a large init_std makes the logits peaked, so greedy decoding has no near-ties
    cfg = ModelConfig(
        vocab_size=128, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, d_model=64, max_seq_len=32, init_std=0.3
    )
    torch.manual_seed(seed)
    return Transformer(cfg)


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_greedy_with_cache_equals_without(n_kv_heads):
    model = build(n_kv_heads)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 128, (3, 5)), torch.randint(0, 128, (2, 1)), [7, 3, 9, 1]]
    # 5 + 35 > max_seq_len: the first prompt also covers the cropped window once the sequence outgrows the cache
    for prompt, n, shape in zip(prompts, (35, 12, 12), ((3, 40), (2, 13), (1, 16))):
        a = generate(model, prompt, n, temperature=0, use_cache=True)
        b = generate(model, prompt, n, temperature=0, use_cache=False)
        assert a.shape == shape
        assert torch.equal(a, b)


def test_cached_logits_match_full_forward():
    model = build().eval()
    tokens = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_kv_cache(2, 20)
        parts = [model(tokens[:, :8], cache=cache, start_pos=0)]  # prefill
        parts += [model(tokens[:, 8:13], cache=cache, start_pos=8)]  # a chunk after a prefix (T > 1, start_pos > 0)
        parts += [model(tokens[:, t : t + 1], cache=cache, start_pos=t) for t in range(13, 20)]  # one token at a time
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


def test_generate_restores_training_flag_and_accepts_list():
    model = build().train()
    out = generate(model, [1, 2, 3], 4, temperature=0)
    assert out.shape == (1, 7) and out[0, :3].tolist() == [1, 2, 3]
    assert model.training
    model.eval()
    generate(model, [1, 2, 3], 1)
    assert not model.training


def test_eos_stops_and_pads_finished_rows():
    model = build()
    prompts = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(3))
    free = generate(model, prompts, 20, temperature=0)[:, 4:]
    # eos := the first token of row 0 that row 1 never produces, so row 0 stops early and row 1 runs on
    first, eos = next((i, t) for i, t in enumerate(free[0].tolist()) if t not in free[1].tolist())
    assert first < 19

    one = generate(model, prompts[:1], 20, temperature=0, eos_id=eos)[:, 4:]  # stops right after eos
    assert one.tolist() == [free[0, : first + 1].tolist()]

    both = generate(model, prompts, 20, temperature=0, eos_id=eos)[:, 4:]  # runs on for row 1
    assert both.size(1) == 20 and torch.equal(both[1], free[1])
    assert both[0, : first + 1].tolist() == free[0, : first + 1].tolist()
    assert (both[0, first:] == eos).all()  # the finished row is padded with eos


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 50)
    assert torch.equal(sample_next(logits, temperature=0, top_k=3, top_p=0.5), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_sampling_distribution(temperature):
    logits = torch.tensor([[0.0, 1.0]]).expand(20000, 2)
    g = torch.Generator().manual_seed(0)
    freq = sample_next(logits, temperature, generator=g).float().mean().item()  # how often token 1
    assert freq == pytest.approx(torch.tensor([0.0, 1.0 / temperature]).softmax(-1)[1].item(), abs=0.015)


def test_top_k_keeps_only_k_tokens():
    logits = torch.randn(4, 50)
    kept = top_k_filter(logits, 5).isfinite()
    assert (kept.sum(-1) == 5).all()
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(5).indices, True))
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([sample_next(logits, 1.0, top_k=5, generator=g) for _ in range(50)])  # (50, 4)
    assert kept.gather(-1, samples.T).all()
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05])
    logits = probs.log()
    for p, expected in [(0.4, {1}), (0.75, {1, 3}), (0.85, {1, 3, 0}), (0.97, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})]:
        kept = set(top_p_filter(logits, p).isfinite().nonzero().flatten().tolist())
        assert kept == expected, p


@pytest.mark.parametrize("seed", range(20))
def test_top_p_property(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 20, generator=g) * 3
    p = float(torch.rand((), generator=g)) * 0.99 + 0.01
    probs = logits.softmax(-1)
    kept = top_p_filter(logits, p).isfinite()
    for row in range(3):
        mass = probs[row][kept[row]]
        assert mass.sum() >= p - 1e-5  # reaches p
        assert mass.sum() - mass.min() < p + 1e-5  # without its least likely token it would not
        dropped = probs[row][~kept[row]]
        assert dropped.numel() == 0 or dropped.max() <= mass.min()  # the most likely tokens


def test_sampling_is_reproducible_with_generator():
    model = build()
    a = generate(model, [1, 2], 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = generate(model, [1, 2], 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
