"""Training-step throughput: distllm's Transformer vs Hugging Face ``LlamaForCausalLM`` of the same shape.

    python benchmarks/bench_train_step.py                      # 6 layers x 384 wide, batch 8 x 256 tokens
    python benchmarks/bench_train_step.py --layers 2 --steps 2 --rounds 2   # quick smoke run

Both models get the same shape (layers, heads, kv heads, width, SwiGLU width, vocabulary, tied
embeddings, RMSNorm eps, RoPE theta; no biases; HF uses attn_implementation="sdpa" and no KV cache)
and the same parameter count, which is checked. Before timing, distllm's weights are copied into the
HF model (splitting the fused projections) and both losses are compared: same math, same work.

One training step = forward + cross-entropy + backward + AdamW step + zero_grad, each library used the
way it normally is: distllm's training loss (``distllm.loss.next_token_loss``: the model's summed
cross-entropy, chunked and fused with its output projection, over the shifted window, divided by the
number of tokens); HF computes the loss inside forward from ``labels``
(``shift_labels`` holds the already shifted targets, so both compute the loss over the same T
positions of a (B, T) input).
fp32 on CPU, bf16 autocast on CUDA.

The two models' timed steps are interleaved (blocks of --steps, alternating which goes first, over
--rounds rounds) so that a noisy shared machine slows both alike; the median step time is reported
(and, as a hint of how noisy the machine was, the ratio of the fastest steps).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distllm.config import ModelConfig
from distllm.loss import next_token_loss
from distllm.model import Transformer, count_params, flops_per_token, mfu, peak_flops


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=None, help="default: same as --heads")
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--untied", action="store_true", help="separate output projection")
    p.add_argument("--steps", type=int, default=1, help="timed steps per model per round (a block)")
    p.add_argument("--rounds", type=int, default=16, help="rounds of one block per model, alternating who goes first")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def hf_twin(cfg: ModelConfig) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,  # default RoPE (transformers 5 files it under rope_parameters)
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def copy_weights(ours: Transformer, hf: LlamaForCausalLM) -> None:
    """Load distllm's weights into the HF model: a pure split of the fused projections."""
    cfg = ours.cfg
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    hf.model.embed_tokens.weight.copy_(ours.tok_emb.weight)
    hf.lm_head.weight.copy_(ours.lm_head.weight)
    hf.model.norm.weight.copy_(ours.norm.weight)
    for src, dst in zip(ours.layers, hf.model.layers):
        q, k, v = src.attn.wqkv.weight.split([q_rows, kv_rows, kv_rows])
        dst.self_attn.q_proj.weight.copy_(q)
        dst.self_attn.k_proj.weight.copy_(k)
        dst.self_attn.v_proj.weight.copy_(v)
        dst.self_attn.o_proj.weight.copy_(src.attn.wo.weight)
        gate, up = src.mlp.w_gate_up.weight.chunk(2)
        dst.mlp.gate_proj.weight.copy_(gate)
        dst.mlp.up_proj.weight.copy_(up)
        dst.mlp.down_proj.weight.copy_(src.mlp.w_down.weight)
        dst.input_layernorm.weight.copy_(src.attn_norm.weight)
        dst.post_attention_layernorm.weight.copy_(src.mlp_norm.weight)


def hf_loss(model: LlamaForCausalLM, window: torch.Tensor) -> torch.Tensor:
    inputs, targets = window[:, :-1], window[:, 1:]  # (B, T) each
    return model(input_ids=inputs, labels=inputs, shift_labels=targets.contiguous()).loss


def make_step(model, loss_fn, window, autocast):
    # fused AdamW for both: distllm's default on CPU and CUDA, and the HF Trainer's default (adamw_torch_fused)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step() -> None:
        with autocast():
            loss = loss_fn(model, window)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        d_model=args.width,
        max_seq_len=args.seq,
        tie_embeddings=not args.untied,
    )
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device).train()
    hf = hf_twin(cfg).to(device).train()
    n_ours, n_hf = count_params(ours), sum(p.numel() for p in hf.parameters())
    if n_ours != n_hf:
        raise SystemExit(f"parameter counts differ: distllm {n_ours:,} vs HF {n_hf:,}")

    if device.type == "cuda":
        dtype = torch.bfloat16
        autocast = lambda: torch.autocast("cuda", dtype=dtype)  # noqa: E731
    else:
        dtype = torch.float32
        autocast = contextlib.nullcontext
    window = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)

    copy_weights(ours, hf)
    with torch.no_grad(), autocast():
        a, b = next_token_loss(ours, window).item(), hf_loss(hf, window).item()
    if abs(a - b) > 1e-3 * abs(b):
        raise SystemExit(f"same weights, different losses: distllm {a:.6f} vs HF {b:.6f}")

    steps = {
        "distllm": make_step(ours, next_token_loss, window, autocast),
        "hf": make_step(hf, hf_loss, window, autocast),
    }
    for step in steps.values():
        for _ in range(args.warmup):
            timed(step, device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for _ in range(args.rounds):
        for name in order:
            times[name] += [timed(steps[name], device) for _ in range(args.steps)]
        order.reverse()

    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.seq)
    peak = peak_flops(device, dtype)
    print(
        f"shape: {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.kv_heads} kv), width {cfg.d_model}, "
        f"ffn {cfg.hidden_dim}, vocab {cfg.vocab_size}, {'tied' if cfg.tie_embeddings else 'untied'}; "
        f"batch {args.batch} x seq {args.seq}; {n_ours / 1e6:.2f}M params; {device.type} {str(dtype)[6:]}, "
        f"{torch.get_num_threads()} threads; loss check {a:.4f} vs {b:.4f}"
    )
    peak_text = "unknown (MFU n/a)" if peak is None else f"{peak / 1e9:.1f} GFLOP/s"
    print(f"peak {peak_text} ({'measured matmul' if device.type == 'cpu' else 'datasheet/measured'}), "
          f"{fpt / 1e6:.1f} MFLOP/token; {args.rounds} rounds x {args.steps} steps per model")
    throughput = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        throughput[name] = tokens / median
        utilisation = mfu(throughput[name], fpt, peak)
        print(
            f"{name:8s} step {median * 1e3:8.1f} ms (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f})  "
            f"{throughput[name]:9.0f} tokens/s  MFU " + ("n/a" if utilisation is None else f"{utilisation:6.1%}")
        )
    best = min(times["hf"]) / min(times["distllm"])
    ratio = throughput["distllm"] / throughput["hf"]
    print(f"ratio distllm/hf tokens/s: {ratio:.3f} (median steps; fastest steps: {best:.3f})")


if __name__ == "__main__":
    main()
