import math

import pytest
import torch

from distllm.config import OptimConfig
from distllm.optim import apply_config, build_optimizer, lr_at, param_groups


def test_cosine_schedule_values():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_at(4, cfg, 110) == pytest.approx(0.5)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)  # end of warmup = peak
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)  # halfway: floor + (peak - floor) / 2
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)  # the floor
    assert lr_at(500, cfg, 110) == pytest.approx(0.1)  # stays there
    expected = 0.1 + 0.45 * (1 + math.cos(math.pi * 25 / 100))
    assert lr_at(35, cfg, 110) == pytest.approx(expected)


def test_wsd_schedule_values():
    cfg = OptimConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=4, schedule="wsd", decay_fraction=0.2)
    assert lr_at(1, cfg, 100) == pytest.approx(1.0)
    assert lr_at(4, cfg, 100) == pytest.approx(2.0)
    assert lr_at(79, cfg, 100) == pytest.approx(2.0)  # stable until the last 20 steps
    assert lr_at(80, cfg, 100) == pytest.approx(2.0)
    assert lr_at(90, cfg, 100) == pytest.approx(1.0)  # halfway through the decay
    assert lr_at(100, cfg, 100) == pytest.approx(0.0)


def test_constant_schedule():
    cfg = OptimConfig(lr=3.0, warmup_steps=0, schedule="constant")
    assert [lr_at(s, cfg, 10) for s in (0, 5, 9)] == [3.0, 3.0, 3.0]


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {p.dim() for p in decay["params"]} == {2}
    assert len(decay["params"]) == 2  # embedding + linear weight
    assert len(no_decay["params"]) == 3  # linear bias + norm weight and bias


def test_shared_parameters_counted_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    decay, _ = param_groups(model, 0.1)
    assert len(decay["params"]) == 1


def test_resumed_optimizer_takes_the_new_config():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    old = build_optimizer(model, OptimConfig(weight_decay=0.1, beta2=0.95, eps=1e-8), "cpu")
    new_cfg = OptimConfig(weight_decay=0.0, beta2=0.99, eps=1e-6)
    opt = build_optimizer(model, new_cfg, "cpu")
    opt.load_state_dict(old.state_dict())  # restores the saved hyperparameters...
    assert opt.param_groups[0]["weight_decay"] == 0.1
    apply_config(opt, new_cfg)  # ...which the resumed run replaces with its config's
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    assert all(g["betas"] == (0.9, 0.99) and g["eps"] == 1e-6 for g in opt.param_groups)


def test_build_optimizer_is_adamw_with_config():
    cfg = OptimConfig(lr=1e-3, beta1=0.8, beta2=0.9, eps=1e-6)
    opt = build_optimizer(torch.nn.Linear(3, 3), cfg, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-6


def test_fused_by_default_on_cpu_and_overridable():
    model = torch.nn.Linear(3, 3)
    assert build_optimizer(model, OptimConfig(), "cpu").defaults["fused"] is True
    assert not build_optimizer(model, OptimConfig(fused=False), "cpu").defaults["fused"]


def test_zero3_placeholders_are_grouped_by_their_real_shape():
    """Under ZeRO-3 (zero.Init) a parameter is an empty 1-D placeholder; its shape is in ds_shape. Grouping
    by the placeholder's dim put every matrix in the no-decay group: training silently lost weight decay."""
    from distllm.optim import param_groups

    matrix, vector = torch.nn.Parameter(torch.empty(0)), torch.nn.Parameter(torch.empty(0))
    matrix.ds_shape, vector.ds_shape = torch.Size([8, 4]), torch.Size([8])
    model = torch.nn.Module()
    model.register_parameter("w", matrix)
    model.register_parameter("g", vector)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["params"] == [matrix] and no_decay["params"] == [vector]
