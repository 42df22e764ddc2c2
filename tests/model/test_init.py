"""Initialisation: identical on every rank for the same seed, done by each module's own constructor
(so DeepSpeed ZeRO-3 ``zero.Init`` partitions initialised parameters), reproducible by init_weights()."""

import math
import os
import subprocess
import sys
import textwrap

import torch

from distllm.config import ModelConfig
from distllm.model import Transformer
from distllm.model.transformer import MLP, Attention


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=128, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_same_seed_same_weights_and_init_weights_reproduces_construction():
    for tie in (True, False):
        cfg = tiny(tie_embeddings=tie)
        torch.manual_seed(7)
        a = Transformer(cfg)
        torch.manual_seed(7)
        b = Transformer(cfg)  # another rank, seeded alike
        assert_same_weights(a, b)
        torch.manual_seed(8)
        c = Transformer(cfg)
        assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)
        torch.manual_seed(7)
        c.init_weights()  # re-initialisation draws in the construction order
        assert_same_weights(a, c)
        assert (c.lm_head.weight is c.tok_emb.weight) == tie


def test_each_module_initialises_its_own_parameters():
    """What ZeRO-3 needs: a submodule is complete when its constructor returns."""
    cfg = tiny(d_model=256, n_heads=4, n_layers=8, init_std=0.05)
    out_std = 0.05 / math.sqrt(2 * 8)
    torch.manual_seed(0)
    attn, mlp = Attention(cfg, 0), MLP(cfg)
    for weight, std in ((attn.wqkv.weight, 0.05), (attn.wo.weight, out_std),
                        (mlp.w_gate_up.weight, 0.05), (mlp.w_down.weight, out_std)):
        assert abs(weight.std().item() - std) < 0.05 * std, (weight.shape, weight.std().item(), std)


ZERO3_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    import deepspeed
    from distllm.config import ModelConfig
    from distllm.model import Transformer

    torch.distributed.init_process_group("gloo")
    # no dtype argument: with one, DeepSpeed 0.19 on CPU builds bf16 parameters regardless
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    for tie in (True, False):
        cfg = ModelConfig(vocab_size=128, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, max_seq_len=32,
                          tie_embeddings=tie)
        torch.manual_seed(0)
        plain = Transformer(cfg)
        torch.manual_seed(0)
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            sharded = Transformer(cfg)
        assert sharded.tok_emb.weight.numel() == 0, "parameters were not partitioned"
        with deepspeed.zero.GatheredParameters(list(sharded.parameters())):
            for (name, a), (_, b) in zip(plain.named_parameters(), sharded.named_parameters()):
                assert a.dtype == b.dtype == torch.float32, (name, b.dtype)
                assert torch.equal(a, b), name
            assert (sharded.lm_head.weight is sharded.tok_emb.weight) == tie
    print("ZERO3_INIT_OK")
    """
)


def test_zero3_init_partitions_the_same_weights(tmp_path):
    """Built under ``deepspeed.zero.Init`` (1 gloo process on CPU), the gathered weights equal a plain
    build from the same seed: nothing is initialised after partitioning."""
    script = tmp_path / "zero3_init.py"
    script.write_text(ZERO3_SCRIPT)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 500),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=280)
    assert r.returncode == 0 and "ZERO3_INIT_OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
