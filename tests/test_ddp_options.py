"""DDP's options that save memory reach the real wrapper under a 2-process launch: gradients live in the
all-reduce buckets (no second gradient-sized copy) and the constant RoPE buffers are not broadcast."""

import json
import sys

from distllm.config import save_config
from distributed_runs import env, free_port

WORKER = """
import json, sys
import torch
from distllm import distributed
from distllm.config import load_config
from distllm.model import Transformer
from distllm.optim import build_optimizer

cfg = load_config(sys.argv[1])
rt = distributed.setup(cfg)
model = Transformer(cfg.model).to(rt.device)
model, optimizer = rt.parallelize(model, build_optimizer(model, cfg.optim, "cpu"), cfg.train)
tokens = torch.randint(0, cfg.model.vocab_size, (2, 9))
with rt.accumulate(model):
    rt.backward(model(tokens[:, :-1]).float().logsumexp(-1).sum(), 16)
grads_in_buckets = all(p.grad is not None for p in model.parameters())
with open(f"{sys.argv[2]}/rank{rt.rank}.json", "w") as f:  # a file each: two ranks' stdout lines may interleave
    json.dump({"wrapper": type(model).__name__, "bucket_view": model.gradient_as_bucket_view,
               "broadcast_buffers": model.broadcast_buffers, "grads": grads_in_buckets}, f)
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # as distllm's main does: no gloo thread left to abort the exit
"""


def test_ddp_wraps_with_bucket_view_gradients_and_no_buffer_broadcast(tiny_config, tmp_path):
    import subprocess

    tiny_config.train.global_batch_size = 8
    save_config(tiny_config, tmp_path / "c.yaml")
    (tmp_path / "worker.py").write_text(WORKER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port()), str(tmp_path / "worker.py"),
                        str(tmp_path / "c.yaml"), str(tmp_path)], env=env(), capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports == [{"wrapper": "DistributedDataParallel", "bucket_view": True, "broadcast_buffers": False,
                        "grads": True}] * 2
