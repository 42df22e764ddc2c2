"""Initialisation: identical on every rank for the same seed, done by each module's own constructor
(so DeepSpeed ZeRO-3 ``zero.Init`` partitions initialised parameters)."""

import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from distllm.config import ModelConfig
from distllm.model import Transformer
from distllm.model.transformer import MLP, Attention


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=128, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_same_seed_same_weights():
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
        assert (a.lm_head.weight is a.tok_emb.weight) == tie


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
    from distllm.model.kernels import rope_tables

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
    # bf16: zero.Init casts every floating tensor its wrapped constructors make, buffers included;
    # the RoPE tables must still be fp32 and exact (bf16 positions: 769 distinct rows of 4,096)
    cfg = ModelConfig(vocab_size=128, n_layers=1, n_heads=4, d_model=64, max_seq_len=4096)
    with deepspeed.zero.Init(dtype=torch.bfloat16):
        sharded = Transformer(cfg)
    assert sharded.tok_emb.weight.dtype == torch.bfloat16, "zero.Init did not build in bf16"
    ref_cos, ref_sin = rope_tables(16, 4096, 10000.0)
    for name, table, ref in (("cos", sharded.rope.cos, ref_cos), ("sin", sharded.rope.sin, ref_sin)):
        assert table.dtype == torch.float32, (name, table.dtype)
        assert torch.equal(table, ref), name
        distinct = len(torch.unique(table, dim=0))
        assert distinct == 4096, f"{name}: {distinct} distinct rows of 4096"
    print("ZERO3_INIT_OK")
    """
)


def test_zero3_init_partitions_the_same_weights(tmp_path):
    """Built under ``deepspeed.zero.Init`` (1 gloo process on CPU), the gathered weights equal a plain
    build from the same seed: nothing is initialised after partitioning. Under ``zero.Init(dtype=bf16)``
    the RoPE tables stay fp32 and equal the reference, every position's row distinct."""
    script = tmp_path / "zero3_init.py"
    script.write_text(ZERO3_SCRIPT)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 500),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=280)
    assert r.returncode == 0 and "ZERO3_INIT_OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_rope_tables_rebuilt_when_an_engine_casts_the_buffers_data():
    """DeepSpeed's ``buffer_dtype`` setting casts buffers by assigning ``.data`` (no ``_apply``): the
    model rebuilds fp32 tables before using them."""
    torch.manual_seed(0)
    model = Transformer(tiny(init_std=0.2, max_seq_len=512)).eval()
    tokens = torch.randint(0, 128, (1, 512))
    with torch.no_grad():
        expected = model(tokens)
        for buf in model.buffers():
            buf.data = buf.data.to(torch.bfloat16)
        got = model(tokens)
    assert model.rope.cos.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


WORKER = Path(__file__).with_name("bf16_engine_worker.py")


def test_zero3_bf16_logits_match_ddp_bf16_on_the_same_weights(tmp_path):
    """``distributed.setup`` with precision bf16 on one CPU process each: DDP (bf16 autocast over fp32
    weights) and ZeRO-3 (bf16 weights built in ``zero.Init``) from the same seed give the same logits,
    fused loss and first step within bf16 tolerance, at positions up to 511 (where bf16 RoPE tables
    rotate neighbouring positions alike: a max logit difference of 0.36 against 0.04 with fp32 tables)."""
    procs = {}
    for engine in ("ddp", "zero3"):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
               "WORLD_SIZE": "1"}
        procs[engine] = subprocess.Popen([sys.executable, str(WORKER), engine, str(tmp_path / f"{engine}.pt")], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for engine, p in procs.items():
        out, err = p.communicate(timeout=280)
        assert p.returncode == 0, f"{engine}:\n{out[-2000:]}{err[-4000:]}"
    ddp, zero3 = (torch.load(tmp_path / f"{e}.pt") for e in ("ddp", "zero3"))
    assert (ddp["param_dtype"], zero3["param_dtype"]) == ("torch.float32", "torch.bfloat16")
    for name in ("cos", "sin"):
        assert zero3[name].dtype == torch.float32 and torch.equal(zero3[name], ddp[name]), name
    scale = ddp["logits"].abs().max().item()
    assert (zero3["logits"] - ddp["logits"]).abs().max().item() < 0.025 * scale
    torch.testing.assert_close(zero3["loss_sum"], ddp["loss_sum"], rtol=5e-3, atol=0)
    torch.testing.assert_close(zero3["step_loss"], ddp["step_loss"], rtol=5e-3, atol=0)
    torch.testing.assert_close(zero3["grad_norm"], ddp["grad_norm"], rtol=3e-2, atol=0)
