"""Per-GPU memory of a run config under DDP and DeepSpeed ZeRO-1/2/3, with and without activation
checkpointing, from the model's shapes (no GPU needed); writes docs/scaling.md.

    python benchmarks/memory_plan.py                      # print the tables for llama-1b and llama3-8b
    python benchmarks/memory_plan.py --write docs/scaling.md
    python benchmarks/memory_plan.py --check-bench-memory # the formula at bench_memory.py's shape (fp32, 2 ranks)

Everything is in bytes per GPU; N = parameters (``count_params``: tied embeddings once), W = GPUs
(data-parallel ranks), B = distllm's communication bucket (``distributed.bucket_elements``: 1/8 of
N, at least d^2, at most 5e8 elements), t = tokens per micro-batch (micro_batch_size x seq_len).
Precision as ``distllm train`` runs bf16 on GPUs: DDP keeps fp32 weights under bf16 autocast;
DeepSpeed keeps bf16 weights and an fp32 master copy (``bf16.enabled``).

    state                   weights      gradients     optimizer (fp32 master + AdamW m, v)  buffers
    DDP (autocast)          4N + 2N*     4N**          8N                                     -
    ZeRO-1 (bf16)           2N           2N + 4N***    (4 + 8) N / W                          2 x 2B (reduce, all-gather)
    ZeRO-2 (bf16)           2N           2N / W        (4 + 8) N / W                          2 x 2B
    ZeRO-3 (bf16)           2N / W       2N / W        (4 + 8) N / W                          2 x 2B (live + prefetched params)
    + ZeRO-2 and ZeRO-3: the fp32 gradient partition the micro-batches accumulate into, 4N / W

    *   autocast's bf16 copies of the weights, made in the forward pass and held for the backward
    **  the gradients live in DDP's all-reduce buckets (distllm sets gradient_as_bucket_view=True): no
        second copy (Accelerate's default would add 4N)
    *** distllm accumulates bf16 gradients in fp32 (``data_types.grad_accum_dtype``); for ZeRO-1 DeepSpeed
        0.19 then runs its BF16_Optimizer, which accumulates into a whole (unpartitioned) fp32 buffer

Activations (bf16 autocast, flash or FlexAttention: no T^2 term), what each transformer block saves
for its backward, per token (d = d_model, h = SwiGLU width, nh / nkv = query / key-value heads,
hd = head dim):

    per layer  a = 4d (attn-norm input, fp32 residual) + 2d (its bf16 output, wqkv's input)
                 + 2d + 4 nkv hd (q, k, v) + 2d + 4 nh (attention output, log-sum-exp)
                 + 2d (wo's input) + 4d (mlp-norm input) + 2d (w_gate_up's input)
                 + 6h (gate_up and silu(gate)) + 2h (w_down's input)
               = 18d + 4 nkv hd + 4 nh + 8h
    without checkpointing: t x L x a;  with it: t x L x 4d (each block's input) + t x a (one block recomputed)
    loss (fused, chunked): t/8 x V x 8 (a chunk's fp32 logits, its bf16 product and gradient)
                           + V x d x 8 (d weight's fp32 sum, one bf16 chunk product, the weight's bf16
                           copy under autocast) + t x d x 8 (d hidden, the final norm's input)

A configuration "fits" when the total is at most 90% of the GPU's memory (the rest: the CUDA
context, the caching allocator's fragmentation, transient activation gradients, NCCL buffers).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 2**30
GPUS = {"H100 80GB": 80 * GiB, "H200 141GB": 141 * GiB}
FIT = 0.9
WORLD_SIZES = (1, 8, 64)
ENGINES = ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3")
PRESETS = ("configs/llama-1b.yaml", "configs/llama3-8b.yaml")


@dataclass
class Plan:
    weights: float
    grads: float
    optimizer: float
    buffers: float
    activations: float
    loss: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.buffers + self.activations + self.loss


def activation_bytes_per_token_layer(m) -> int:
    """What one block saves for backward per token (the module docstring's ``a``)."""
    return 18 * m.d_model + 4 * m.kv_heads * m.head_dim + 4 * m.n_heads + 8 * m.hidden_dim


def plan(cfg, engine: str, world: int, checkpointing: bool, micro_batch: int | None = None) -> Plan:
    from distllm.distributed import bucket_elements
    from distllm.model import count_params

    m = cfg.model
    n = count_params(m)
    t = (micro_batch or cfg.train.micro_batch_size) * cfg.data.seq_len
    a = activation_bytes_per_token_layer(m)
    if checkpointing:
        acts = t * m.n_layers * 4 * m.d_model + t * a
    else:
        acts = t * m.n_layers * a
    chunk = max(1024, math.ceil(t / 8))
    loss = min(chunk, t) * m.vocab_size * 8 + m.vocab_size * m.d_model * 8 + t * m.d_model * 8
    if engine == "DDP":  # gradients are views of the all-reduce buckets: no second copy
        return Plan(weights=6 * n, grads=4 * n, optimizer=8 * n, buffers=0, activations=acts, loss=loss)
    bucket = bucket_elements(cfg)
    shard = n / world
    weights = 2 * n if engine in ("ZeRO-1", "ZeRO-2") else 2 * shard
    grads = 2 * n + 4 * n if engine == "ZeRO-1" else 2 * shard + 4 * shard  # bf16 grads + fp32 accumulation
    return Plan(weights=weights, grads=grads, optimizer=12 * shard, buffers=2 * 2 * bucket,
                activations=acts, loss=loss)


def launch_line(preset: str, engine: str, world: int, checkpointing: bool) -> str:
    ac = f" --train.activation_checkpointing={'true' if checkpointing else 'false'}"
    zero = "" if engine == "DDP" else f" --distributed.zero_stage={engine[-1]}"
    if world == 1:
        return f"distllm train {preset}{zero}{ac}"
    if world == 8:
        return f"torchrun --nproc_per_node 8 -m distllm train {preset}{zero}{ac}"
    return f"sbatch --nodes {world // 8} launch/slurm/train.sbatch {preset}{zero}{ac}"


def tables(preset: str) -> list[str]:
    from distllm.config import load_config
    from distllm.distributed import bucket_elements
    from distllm.model import count_params

    cfg = load_config(ROOT / preset)
    m = cfg.model
    n = count_params(m)
    t = cfg.train.micro_batch_size * cfg.data.seq_len
    name = Path(preset).stem
    out = [f"### {name}", "",
           f"N = {n / 1e9:.2f}B parameters ({'tied' if m.tie_embeddings else 'untied'} embeddings, vocabulary "
           f"{m.vocab_size:,}), {m.n_layers} layers, d = {m.d_model}, h = {m.hidden_dim}, {m.n_heads} / {m.kv_heads} "
           f"heads; micro-batch {cfg.train.micro_batch_size} x {cfg.data.seq_len} = {t:,} tokens "
           f"(the preset's; activation checkpointing {'on' if cfg.train.activation_checkpointing else 'off'} in it); "
           f"a = {activation_bytes_per_token_layer(m) / 1024:.1f} KiB per token per layer; "
           f"bucket B = {bucket_elements(cfg) / 1e6:.0f}M elements.", "",
           "GiB per GPU (weights + gradients + optimizer + buffers + activations + loss = total); "
           "fits: total <= 90% of the GPU.", "",
           "| GPUs | engine | act. ckpt | weights | grads | optim | buffers | activations | loss | total | 80 GiB | 141 GiB |",
           "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | :---: |"]
    for world in WORLD_SIZES:
        for engine in ENGINES:
            for ac in (False, True):
                p = plan(cfg, engine, world, ac)
                fits = ["yes" if p.total <= FIT * cap else "no" for cap in GPUS.values()]
                out.append(f"| {world} | {engine} | {'on' if ac else 'off'} | {p.weights / GiB:.1f} | {p.grads / GiB:.1f} | "
                           f"{p.optimizer / GiB:.1f} | {p.buffers / GiB:.1f} | {p.activations / GiB:.1f} | "
                           f"{p.loss / GiB:.1f} | **{p.total / GiB:.1f}** | {fits[0]} | {fits[1]} |")
    out.append("")
    out.append("Launch lines (the cheapest engine that fits on 80 GiB at each scale, the preset's checkpointing first):")
    out.append("")
    out.append("```bash")
    for world in WORLD_SIZES:
        choice = None
        for ac in (cfg.train.activation_checkpointing, not cfg.train.activation_checkpointing):
            for engine in ENGINES:
                if plan(cfg, engine, world, ac).total <= FIT * GPUS["H100 80GB"]:
                    choice = (engine, ac)
                    break
            if choice:
                break
        if choice:
            out.append(f"{launch_line(preset, choice[0], world, choice[1])}   # {world} GPU(s): {choice[0]}")
        else:
            out.append(f"# {world} GPU(s): nothing fits on 80 GiB at micro-batch {cfg.train.micro_batch_size}; "
                       "lower train.micro_batch_size")
    out.append("```")
    out.append("")
    return out


def check_bench_memory(tiny: bool = False) -> list[str]:
    """The state formula at benchmarks/bench_memory.py's full shape: fp32 (no autocast copies, no bf16
    weights), 2 ranks, DeepSpeed ZeRO-3 stepping its fp32 partitions (no master copy). Counted as
    bench_memory counts ("state": params + master + grads + optimizer, buckets included in grads,
    DDP's C++ reducer buckets not counted)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_memory import FULL_MODEL, TINY_MODEL

    from distllm.config import from_dict
    from distllm.distributed import bucket_elements
    from distllm.model import count_params

    shape = TINY_MODEL if tiny else FULL_MODEL
    cfg = from_dict({"model": shape, "tokenizer": {"vocab_size": shape["vocab_size"]}})
    n, w, mb = count_params(cfg.model), 2, 1e6
    bucket = bucket_elements(cfg)
    ddp = 4 * n + 4 * n + 8 * n
    zero1_optim = 8 * n / w
    zero3 = (4 + 4 + 8) * n / w + 4 * bucket  # one fp32 reduce bucket held with the gradients
    return [f"bench_memory{' --tiny' if tiny else ''} shape: {n / 1e6:.2f}M parameters, fp32, 2 ranks, bucket "
            f"{bucket / 1e6:.2f}M elements",
            f"predicted DDP state per rank {ddp / mb:.0f} MB; ZeRO-1 AdamW moments per rank {zero1_optim / mb:.0f} MB "
            f"= {zero1_optim / (8 * n):.2f}x DDP's; ZeRO-3 state per rank {zero3 / mb:.1f} MB = {zero3 / ddp:.2f}x DDP's "
            f"(params {4 * n / w / mb:.1f}, grads {4 * n / w / mb:.1f} + bucket {4 * bucket / mb:.1f}, "
            f"optimizer {8 * n / w / mb:.1f})"]


START, END = "<!-- memory_plan.py: begin -->", "<!-- memory_plan.py: end -->"


def render(text: str) -> str:
    """``text`` (the note) with the tables between its markers regenerated (appended if it has none)."""
    generated = "\n".join([START, "", *[line for preset in PRESETS for line in tables(preset)], END])
    if START in text and END in text:
        return text[: text.index(START)] + generated + text[text.index(END) + len(END):]
    return text + ("\n" if text else "") + generated + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", help="write the tables into this markdown file (between its markers)")
    p.add_argument("--check-bench-memory", action="store_true")
    p.add_argument("--tiny", action="store_true", help="with --check-bench-memory: bench_memory --tiny's shape")
    args = p.parse_args()
    if args.check_bench_memory:
        print("\n".join(check_bench_memory(args.tiny)))
    elif args.write:
        note = Path(args.write)
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(render(note.read_text() if note.exists() else ""))
        print(f"wrote {note}")
    else:
        print("\n".join(line for preset in PRESETS for line in tables(preset)))


if __name__ == "__main__":
    main()
