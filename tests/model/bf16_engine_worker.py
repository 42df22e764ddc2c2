"""One process of tests/model/test_init.py's bf16 engine comparison: build the model the way
``distllm.train`` does (``distributed.setup``, ``rt.init_context()``, ``rt.parallelize``) under DDP
(Accelerate's bf16 autocast over fp32 weights) or DeepSpeed ZeRO-3 (bf16 weights built inside
``zero.Init``), and save what the test compares: the RoPE tables, eval logits, the summed loss of
``model(x, labels=y)``, and one training step's loss and gradient norm.

    python tests/model/bf16_engine_worker.py {ddp|zero3} OUT.pt
"""

import sys

import torch

from distllm import distributed
from distllm.config import from_dict
from distllm.model import Transformer
from distllm.optim import build_optimizer

SEQ = 512  # positions past 256, where bf16 tables would share rotations


def main(engine: str, out: str) -> None:
    raw = {
        "model": {"vocab_size": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_model": 64, "max_seq_len": SEQ,
                  "init_std": 0.1},
        "tokenizer": {"vocab_size": 128},
        "data": {"seq_len": SEQ},
        "train": {"micro_batch_size": 1, "global_batch_size": 1, "device": "cpu", "precision": "bf16"},
        "distributed": {"zero_stage": 3 if engine == "zero3" else None},
    }
    cfg = from_dict(raw)
    rt = distributed.setup(cfg)
    torch.manual_seed(cfg.train.seed)
    with rt.init_context():
        model = Transformer(cfg.model)
    if rt.zero_stage != 3:
        model = model.to(rt.device)
    optimizer = build_optimizer(model, cfg.optim, rt.device.type)
    model, optimizer = rt.parallelize(model, optimizer, cfg.train)
    module = rt.unwrap(model)
    tokens = torch.randint(0, 128, (1, SEQ + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    model.eval()
    with torch.no_grad():
        logits = model(inputs).float()
        loss_sum = model(inputs, labels=labels).float()
    model.train()
    with rt.accumulate(model):
        step_loss = model(inputs, labels=labels) / labels.numel()
        rt.backward(step_loss)
    grad_norm, _ = rt.optimizer_step(model, optimizer, cfg.optim.grad_clip)
    torch.save({"param_dtype": str(next(module.parameters()).dtype), "cos": module.rope.cos, "sin": module.rope.sin,
                "logits": logits, "loss_sum": loss_sum, "step_loss": step_loss.detach().float(),
                "grad_norm": torch.as_tensor(grad_norm).float()}, out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
