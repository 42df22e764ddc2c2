"""The Python side of benchmarks/gpu_check.sh: GPU throughput against Hugging Face, synthetic data for
``distllm train``, and export parity on the GPU. Each subcommand also runs tiny on CPU (``--tiny``:
fp32, no compile), which is how tests/test_benchmarks.py checks it without a GPU.

    python benchmarks/bench_gpu.py throughput --preset configs/llama-1b.yaml --seq 2048 --micro-batch 8
    python benchmarks/bench_gpu.py throughput --tiny                 # CPU smoke run
    python benchmarks/bench_gpu.py synth-data DIR [--tokens N]       # random tokens, a tiny tokenizer
    python benchmarks/bench_gpu.py export-parity RUN_DIR OUT_DIR [--device cuda]
    python benchmarks/bench_gpu.py summary PARTS_FILE               # gpu_check.sh's closing table

``throughput``: training steps (forward, loss, backward, fused AdamW, zero_grad) of the preset's model
shape at --seq x --micro-batch tokens, the way ``distllm train`` runs them on one GPU: fp32 weights
under bf16 autocast, each transformer block compiled (``block.compile()``, as ``train.compile`` does),
the loss fused into the model (``model(x, labels=y)``). The baseline, in the same process afterwards:
Hugging Face ``LlamaForCausalLM`` of the same shape (attn_implementation="sdpa", each decoder layer
compiled the same way, its own loss from ``labels``), weights copied from distllm's and the two losses
checked equal first. Printed per model: tokens/s (median step), MFU (``distllm.model.flops``: 6N +
attention FLOPs per token against the datasheet bf16 peak), peak memory (CUDA allocator's peak over
the timed steps), compile time (first step minus the median step). A micro-batch that does not fit
is halved for that model (at most twice) and said so. The last line is ``SUMMARY {json}`` for
gpu_check.sh.

``synth-data``: a data directory ``distllm train`` reads (manifest, shards, tokenizer.json): random
token ids below a 512-token byte-level BPE tokenizer's vocabulary, end-of-text included, so document
masks have documents. No download.

``export-parity``: ``distllm export`` of the run's latest checkpoint, then the exported model loaded
by ``transformers`` and the distllm model from the checkpoint, both fp32 on --device: the max
|logit difference| on random tokens (target <= 1e-3; TF32 off for the comparison).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

TINY_MODEL = {"vocab_size": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_model": 64, "max_seq_len": 64}


# ---------------------------------------------------------------------------------------------- throughput


def model_config(preset: str | None, seq: int, tiny: bool):
    """The preset's ModelConfig (its ``model:`` section), max_seq_len at least ``seq``."""
    from distllm.config import load_config

    cfg = load_config(preset).model if preset else load_config(None).model
    if tiny:
        for key, value in TINY_MODEL.items():
            setattr(cfg, key, value)
        cfg.ffn_hidden = None
    cfg.max_seq_len = max(cfg.max_seq_len, seq)
    return cfg


def hf_copy(cfg, ours):
    """LlamaForCausalLM of the same shape with distllm's weights (bench_train_step's twin and copy)."""
    from bench_train_step import copy_weights, hf_twin

    hf = hf_twin(cfg)
    copy_weights(ours, hf)
    return hf


def measure(name: str, model, loss_fn, window, device, dtype, compile_blocks, steps: int, warmup: int) -> dict:
    """Compile (per block), warm up, time ``steps`` training steps on ``window`` (B, T+1); the median step."""
    from distllm.config import OptimConfig
    from distllm.optim import build_optimizer

    blocks = model.layers if hasattr(model, "layers") else model.model.layers
    if compile_blocks:
        for block in blocks:
            block.compile()
    optimizer = build_optimizer(model, OptimConfig(), device.type)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    inputs, labels = window[:, :-1], window[:, 1:]

    def step() -> torch.Tensor:
        with autocast:
            loss = loss_fn(model, inputs, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for i in range(warmup + steps):
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times[warmup:])
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"name": name, "micro_batch": inputs.size(0), "step_s": median, "first_step_s": times[0],
            "compile_s": max(0.0, times[0] - median), "peak_bytes": peak, "loss": float(loss.detach())}


def measure_fitting(name: str, model, loss_fn, vocab: int, seq: int, batch: int, args, device, dtype) -> dict:
    """``measure`` at micro-batch ``batch``, halved (at most twice) while it runs out of GPU memory."""
    for attempt in range(3):
        window = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
        try:
            return measure(name, model, loss_fn, window, device, dtype, args.compile, args.steps, args.warmup)
        except torch.OutOfMemoryError:
            if attempt == 2 or batch == 1:
                raise
        # out of the except block: the failed attempt's frames (and tensors) are gone
        model.zero_grad(set_to_none=True)
        del window
        gc.collect()
        torch.cuda.empty_cache()
        print(f"{name}: micro-batch {batch} x {seq} did not fit in GPU memory; trying {batch // 2}", flush=True)
        batch //= 2


def throughput(args) -> dict:
    from distllm.model import Transformer, count_params, flops_per_token, mfu, peak_flops
    from distllm.model.kernels import enable_tf32_matmuls

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    enable_tf32_matmuls(device.type)
    cfg = model_config(args.preset, args.seq, args.tiny)
    T = args.seq
    fpt = flops_per_token(cfg, T)
    peak = peak_flops(device, dtype)
    summary = {"preset": args.preset or "tiny", "seq": T, "dtype": args.dtype, "compile": args.compile,
               "params": count_params(cfg), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "peak_flops": peak}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    torch.manual_seed(0)
    with torch.device(device):  # built where it trains (a 1B model initialises in seconds on a GPU)
        ours = Transformer(cfg).train()
        hf = None if args.no_hf else hf_copy(cfg, ours).train()
    results = {}
    if hf is not None:  # the same weights give the same loss (one sequence)
        check = torch.randint(0, cfg.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad(), autocast:
            a = (ours(check[:, :-1], labels=check[:, 1:]) / T).item()
            b = hf(input_ids=check[:, :-1], labels=check[:, :-1], shift_labels=check[:, 1:].contiguous()).loss.item()
        summary["loss_check"] = [a, b]
        if abs(a - b) > 2e-2 * abs(b):
            raise SystemExit(f"same weights, different losses: distllm {a:.5f} vs HF {b:.5f}")
        hf.cpu()  # off the GPU while distllm is measured
    results["distllm"] = measure_fitting("distllm", ours, lambda m, x, y: m(x, labels=y) / y.numel(), cfg.vocab_size,
                                         T, args.micro_batch, args, device, dtype)
    del ours
    torch._dynamo.reset()  # drop distllm's compiled blocks and whatever they hold
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if hf is not None:
        hf.to(device)
        results["hf"] = measure_fitting("hf", hf, lambda m, x, y: m(input_ids=x, labels=x, shift_labels=y.contiguous()).loss,
                                        cfg.vocab_size, T, args.micro_batch, args, device, dtype)
        del hf
    print(f"{summary['preset']}: {summary['params'] / 1e6:.1f}M params, seq {T}, {summary['device']} {args.dtype}"
          f"{' autocast' if dtype == torch.bfloat16 else ''}, {'compiled blocks' if args.compile else 'eager'}; "
          f"{fpt / 1e9:.2f} GFLOP/token; peak " + ("unknown (MFU n/a)" if peak is None else f"{peak / 1e12:.3g} TFLOP/s"))
    for name, r in results.items():
        r["tokens_per_s"] = r["micro_batch"] * T / r["step_s"]
        r["mfu"] = mfu(r["tokens_per_s"], fpt, peak)
        mem = "n/a (CPU)" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.1f} GiB"
        print(f"{name:8s} micro-batch {r['micro_batch']} x {T}: {r['tokens_per_s']:10,.0f} tokens/s  MFU "
              + ("n/a" if r["mfu"] is None else f"{r['mfu']:6.1%}")
              + f"  peak memory {mem}  compile {r['compile_s']:.1f} s (first step {r['first_step_s']:.1f} s,"
              f" step {r['step_s'] * 1e3:.1f} ms)", flush=True)
        summary[name] = r
    if "hf" in results:
        summary["ratio_vs_hf"] = results["distllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
        print(f"ratio distllm/hf tokens/s: {summary['ratio_vs_hf']:.3f} (target >= 1.2: "
              f"{'met' if summary['ratio_vs_hf'] >= 1.2 else 'MISSED'})")
    m = results["distllm"]["mfu"]
    print("distllm MFU: " + ("n/a" if m is None else f"{m:.1%} (target >= 50%: {'met' if m >= 0.5 else 'MISSED'})"))
    print("SUMMARY " + json.dumps(summary), flush=True)
    return summary


# ---------------------------------------------------------------------------------------------- data


def synth_data(args) -> Path:
    """A prepared data directory of random tokens (train and val splits)."""
    import numpy as np

    from distllm.data.shards import dtype_for_vocab, write_manifest, write_shard
    from distllm.tokenizer import EOT, eot_id, fingerprint, save_tokenizer, train_tokenizer

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=False)
    text = [f"def f{i}(x):\n    return x * {i} + {i * i}  # synthetic line {i}\n" for i in range(2000)]
    tok = train_tokenizer(text, vocab_size=512)
    save_tokenizer(tok, out / "tokenizer.json")
    fp, vocab, eot = fingerprint(tok), tok.get_vocab_size(), eot_id(tok)
    rng = np.random.default_rng(0)
    dtype = dtype_for_vocab(vocab)
    manifest = {"format_version": 1, "source": "synthetic random tokens (benchmarks/bench_gpu.py)", "created": "now",
                "tokenizer": {"file": "tokenizer.json", "fingerprint": fp, "vocab_size": vocab, "eot_id": eot},
                "dtype": np.dtype(dtype).name, "splits": {}}
    for split, n in (("train", args.tokens), ("val", max(args.tokens // 10, 20_000))):
        tokens = rng.integers(0, vocab, n).astype(dtype)
        tokens[rng.random(n) < 1 / 300] = eot  # documents of ~300 tokens
        tokens[-1] = eot
        entry = write_shard(out / f"{split}_000000.bin", tokens, fp)
        manifest["splits"][split] = {"num_tokens": int(n), "num_documents": int((tokens == eot).sum()), "shards": [entry]}
    write_manifest(out, manifest)
    print(f"wrote {out}: {args.tokens} train tokens, vocabulary {vocab} ({EOT} = {eot})")
    return out


# ---------------------------------------------------------------------------------------------- export parity


def export_parity(args) -> float:
    from transformers import AutoModelForCausalLM

    from distllm import checkpoint
    from distllm.config import from_dict
    from distllm.export import export
    from distllm.model import Transformer

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # an exact fp32 comparison
    ckpt = checkpoint.locate(args.run_dir)
    out = export(ckpt, args.out)
    state = checkpoint.read_state(ckpt)
    ours = Transformer(from_dict({"model": state["config"]["model"]}).model)
    checkpoint.load_weights(ckpt, ours)
    ours = ours.to(device).eval()
    hf = AutoModelForCausalLM.from_pretrained(out).float().to(device).eval()  # exported in fp32
    T = min(256, ours.cfg.max_seq_len)
    x = torch.randint(0, ours.cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    ok = diff <= 1e-3
    print(f"export parity on {device.type}: {type(hf).__name__} from {out}, max |logit difference| {diff:.2e} "
          f"over 2 x {T} tokens (target <= 1e-3: {'met' if ok else 'MISSED'})")
    print("SUMMARY " + json.dumps({"export_max_abs_diff": diff, "ok": ok}), flush=True)
    if not ok:
        raise SystemExit(1)
    return diff


# ---------------------------------------------------------------------------------------------- summary


def summary_lines(parts_file: Path) -> list[str]:
    """The table gpu_check.sh ends with: one row per part (status, seconds, its figures)."""
    rows = []
    for line in Path(parts_file).read_text().splitlines():
        name, status, seconds, log = line.split("\t")
        text = Path(log).read_text(errors="replace") if Path(log).exists() else ""
        found = [json.loads(x[len("SUMMARY "):]) for x in text.splitlines() if x.startswith("SUMMARY ")]
        steps = [x for x in text.splitlines() if x.lstrip().startswith("step ") and "tok/s" in x]
        figures = ""
        if found and "distllm" in found[-1]:
            figures = _throughput_figures(found[-1])
        elif found and "export_max_abs_diff" in found[-1]:
            figures = f"max |logit diff| {found[-1]['export_max_abs_diff']:.1e} (target <= 1e-3)"
        elif steps:
            figures = steps[-1].split("|", 1)[1].strip()  # the step's loss, lr, grad_norm, tok/s, mfu
        elif name == "gpu-tests":
            figures = next((x.strip() for x in reversed(text.splitlines()) if " passed" in x or " failed" in x
                            or " skipped" in x or "error" in x), "")
        if status != "ok" and not figures:
            figures = next((x.strip()[:160] for x in text.splitlines() if "error" in x.lower()), "")
        rows.append((name, status, f"{seconds} s", figures))
    width = [max(len(r[i]) for r in rows + [("part", "status", "time", "")]) for i in range(3)]
    out = ["SUMMARY of the GPU check", f"{'part':<{width[0]}}  {'status':<{width[1]}}  {'time':>{width[2]}}  figures"]
    out += [f"{n:<{width[0]}}  {st:<{width[1]}}  {t:>{width[2]}}  {f}" for n, st, t, f in rows]
    failed = [r[0] for r in rows if r[1] != "ok"]
    out.append(f"{len(rows) - len(failed)} of {len(rows)} parts ok" + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return out


def _throughput_figures(s: dict) -> str:
    def one(name: str) -> str:
        r = s[name]
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        mem = "" if r["peak_bytes"] is None else f", {r['peak_bytes'] / 2**30:.1f} GiB"
        return (f"{name} B={r['micro_batch']} {r['tokens_per_s']:,.0f} tok/s, MFU {mfu}{mem}, "
                f"compile {r['compile_s']:.0f} s")

    text = f"seq {s['seq']}: " + one("distllm")
    if "hf" in s:
        text += f" | {one('hf')} | ratio {s['ratio_vs_hf']:.2f}x (target >= 1.2x)"
    return text + " | target MFU >= 50%"


# ---------------------------------------------------------------------------------------------- CLI


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput", help="distllm vs Hugging Face training steps")
    t.add_argument("--preset", help="a run config whose model section is measured (e.g. configs/llama-1b.yaml)")
    t.add_argument("--seq", type=int, default=2048)
    t.add_argument("--micro-batch", type=int, default=8)
    t.add_argument("--steps", type=int, default=6, help="timed steps per model")
    t.add_argument("--warmup", type=int, default=2, help="untimed steps per model (the first compiles)")
    t.add_argument("--device", default="cuda")
    t.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    t.add_argument("--no-compile", dest="compile", action="store_false")
    t.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    t.add_argument("--tiny", action="store_true", help="CPU smoke run: a 2-layer model, seq 32, fp32, no compile")
    d = sub.add_parser("synth-data", help="a prepared data directory of random tokens")
    d.add_argument("dir")
    d.add_argument("--tokens", type=int, default=2_000_000)
    e = sub.add_parser("export-parity", help="export a run's checkpoint and compare logits with transformers")
    e.add_argument("run_dir")
    e.add_argument("out")
    e.add_argument("--device", default="cuda")
    m = sub.add_parser("summary", help="gpu_check.sh's closing table from its parts file")
    m.add_argument("parts_file")
    args = p.parse_args(argv)
    if args.command == "throughput":
        if args.tiny:
            args.device, args.dtype, args.compile = "cpu", "fp32", False
            args.seq, args.micro_batch, args.steps, args.warmup = 32, 2, 2, 1
            torch.set_num_threads(1)  # a toy model gains nothing from threads
        throughput(args)
    elif args.command == "synth-data":
        synth_data(args)
    elif args.command == "summary":
        lines = summary_lines(Path(args.parts_file))
        print("\n".join(lines))
        if "not ok" in lines[-1]:
            raise SystemExit(1)
    else:
        export_parity(args)


if __name__ == "__main__":
    main()
