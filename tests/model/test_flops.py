import pytest
import torch

from distllm.config import ModelConfig
from distllm.model import Transformer, count_params, flops_per_token, mfu, peak_flops
from distllm.model import flops as flops_module


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=128, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_count_params_matches_built_model(tie, n_kv_heads):
    cfg = tiny(tie_embeddings=tie, n_kv_heads=n_kv_heads)
    model = Transformer(cfg)
    unique = {p.data_ptr(): p.numel() for p in model.state_dict(keep_vars=True).values() if p.requires_grad}
    assert count_params(cfg) == count_params(model) == sum(unique.values())
    table = cfg.vocab_size * cfg.d_model
    if tie:
        assert count_params(cfg, exclude_embedding=True) == count_params(cfg)  # the matrix is the output projection
    else:
        assert count_params(cfg, exclude_embedding=True) == count_params(cfg) - table
    assert count_params(model, exclude_embedding=True) == count_params(cfg, exclude_embedding=True)


def test_flops_per_token_hand_computed():
    cfg = tiny()  # head_dim 16, hidden_dim = 64 * ceil(int(8 * 64 / 3) / 64) = 192
    wqkv = 64 * (4 + 2 * 2) * 16  # 8192
    wo = 64 * 64  # 4096
    mlp = 3 * 64 * 192  # 36864
    norms = 2 * 64
    n = 2 * (wqkv + wo + mlp + norms) + 64 + 128 * 64  # layers + final norm + output projection = 106816
    assert n == 106816
    assert count_params(cfg, exclude_embedding=True) == n
    assert flops_per_token(cfg, 32) == 6 * 106816 + 12 * 2 * 64 * 32 == 690048
    assert flops_per_token(tiny(tie_embeddings=False), 32) == 690048  # the input table does no matmul


def test_mfu():
    assert mfu(1000.0, 1e9, 4e12) == pytest.approx(0.25)


def test_peak_flops_cpu_is_measured_and_cached():
    a = peak_flops(torch.device("cpu"), torch.float32)
    assert 1e8 < a < 1e14
    assert peak_flops("cpu", torch.float32) == a


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("Tesla V100-SXM2-16GB", 125e12),
    ],
)
def test_peak_flops_gpu_datasheet(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), torch.bfloat16) == expected


def test_peak_flops_unknown_gpu_falls_back_to_measurement(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU 9000")
    monkeypatch.setattr(flops_module, "measured_matmul_flops", lambda *args: 42.0)
    assert peak_flops(torch.device("cuda", 0), torch.bfloat16) == 42.0
