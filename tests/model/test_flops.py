import json
import logging

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


@pytest.fixture
def peak_cache(tmp_path, monkeypatch):
    """A private cache file and an empty per-process memory; measurements counted, never timed."""
    monkeypatch.setenv("DISTLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(flops_module, "_peaks", {})
    class Calls(list):
        quick_answer: list

    calls = Calls()

    def fake_measure(device_type, device_index, dtype, trials=5):
        calls.append((device_type, dtype) if trials > 1 else "quick")
        return 100e9 + len(calls) if trials > 1 else quick_answer[0]  # a different answer each time

    quick_answer = [0.0]  # what a process's one short trial measures (0: less than any cached peak)
    calls.quick_answer = quick_answer

    monkeypatch.setattr(flops_module, "measured_matmul_flops", fake_measure)
    return calls


def test_peak_is_measured_once_per_machine_and_cached_in_a_file(peak_cache, monkeypatch):
    path = flops_module.peak_cache_file()
    assert path.name == "peak_flops.json" and not path.exists()
    first = peak_flops("cpu", torch.float32)
    assert peak_cache == [("cpu", torch.float32)] and first == 100e9 + 1
    assert peak_flops("cpu", torch.bfloat16) == first  # the CPU path trains in fp32: same key
    table = json.loads(path.read_text())
    (key,) = table
    assert flops_module.cpu_model() in key and f"{torch.get_num_threads()} threads" in key and "float32" in key
    assert table[key] == first

    monkeypatch.setattr(flops_module, "_peaks", {})  # a new process on the same machine: read, one quick trial
    assert peak_flops("cpu", torch.float32) == first and peak_cache[1:] == ["quick"]
    monkeypatch.setattr(flops_module, "_peaks", {})  # a quiet machine measures more: the cache ratchets up
    peak_cache.quick_answer[0] = 150e9
    assert peak_flops("cpu", torch.float32) == 150e9 and json.loads(path.read_text())[key] == 150e9
    monkeypatch.setattr(flops_module, "_peaks", {})  # a busy moment never lowers it
    peak_cache.quick_answer[0] = 20e9
    assert peak_flops("cpu", torch.float32) == 150e9
    peak_cache[:] = [c for c in peak_cache if c != "quick"]

    torch.set_num_threads(torch.get_num_threads() + 1)  # another thread count is another peak
    assert peak_flops("cpu", torch.float32) == 100e9 + 2
    assert len(json.loads(path.read_text())) == 2


def test_corrupt_or_unwritable_cache_only_costs_a_measurement(peak_cache, monkeypatch, tmp_path):
    path = flops_module.peak_cache_file()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert peak_flops("cpu", torch.float32) == 100e9 + 1
    assert list(json.loads(path.read_text()).values()) == [100e9 + 1]  # rewritten whole
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DISTLLM_CACHE_DIR", str(blocker / "sub"))  # cannot be a directory
    monkeypatch.setattr(flops_module, "_peaks", {})
    assert peak_flops("cpu", torch.float32) == 100e9 + 2


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("DISTLLM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert flops_module.peak_cache_file() == tmp_path / "distllm" / "peak_flops.json"
    monkeypatch.setenv("DISTLLM_CACHE_DIR", str(tmp_path / "mine"))
    assert flops_module.peak_cache_file() == tmp_path / "mine" / "peak_flops.json"


def test_mfu_never_exceeds_one_and_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(flops_module, "_mfu_warned", False)
    with caplog.at_level(logging.WARNING, logger="distllm"):
        assert mfu(1000.0, 1e9, 0.5e12) == 1.0  # 2e12 achieved against a 0.5e12 "peak"
        assert mfu(1000.0, 1e9, 0.25e12) == 1.0
        assert mfu(1000.0, 1e9, 4e12) == pytest.approx(0.25)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "200%" in warnings[0].getMessage() and "underestimated" in warnings[0].getMessage()
    assert "logging.peak_flops" in warnings[0].getMessage()


def test_measured_peak_is_a_plausible_cpu_figure():
    flops = flops_module.measured_matmul_flops("cpu", None, torch.float32, trials=2, seconds=0.05, pause=0.0)
    assert 1e8 < flops < 1e14


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),  # SXM
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA B200", 2250e12),
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


@pytest.mark.parametrize("name", ["Mystery GPU 9000", "NVIDIA GB200", "NVIDIA H20", "NVIDIA L40G"])
def test_unknown_gpu_has_no_peak_and_no_mfu(monkeypatch, peak_cache, name):
    """A GPU outside the table (including near-misses of its names) gets no peak and MFU None, never a
    measured or neighbouring figure; nothing is measured or cached for it."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), torch.bfloat16) is None
    assert mfu(1000.0, 1e9, None) is None
    assert peak_cache == [] and not flops_module.peak_cache_file().exists()


def test_format_record_prints_unknown_mfu_as_n_a():
    from distllm.metrics import format_record

    record = {"step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1234.0}
    assert format_record({**record, "mfu": None}).endswith("| mfu n/a")
    assert format_record({**record, "mfu": 0.4125}).endswith("| mfu 41.25%")


def test_tf32_is_enabled_on_cuda_only(monkeypatch):
    from distllm.model.kernels import enable_tf32_matmuls

    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    assert enable_tf32_matmuls("cpu") is False and calls == []  # CPU fp32 matmuls stay exact
    assert enable_tf32_matmuls("cuda") is True and calls == ["high"]
