"""benchmarks/memory_plan.py: docs/scaling.md's tables are what the script makes from today's presets,
and its state formula gives the per-rank figures bench_memory.py measured (recorded in the note)."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_plan  # noqa: E402

NOTE = ROOT / "docs" / "scaling.md"


def test_scaling_note_is_generated_from_the_current_presets():
    text = NOTE.read_text()
    assert memory_plan.render(text) == text, "stale: run python benchmarks/memory_plan.py --write docs/scaling.md"


def test_state_formula_matches_bench_memory_measurements():
    """bench_memory (fp32, 2 ranks): ZeRO-1 holds 0.50x DDP's AdamW moments and ZeRO-3 0.53x DDP's state,
    at the tiny shape (1.2 of 2.2 MB) and the full one (README)."""
    for tiny, zero3_mb in ((True, "1.2"), (False, "855.8")):
        text = "\n".join(memory_plan.check_bench_memory(tiny))
        assert "= 0.50x DDP's" in text, text
        m = re.search(r"ZeRO-3 state per rank ([0-9.]+) MB = ([0-9.]+)x", text)
        assert m and m.group(1) == zero3_mb and m.group(2) == "0.53", text


def test_sharding_divides_the_state_by_the_number_of_gpus():
    from distllm.config import load_config
    from distllm.model import count_params

    cfg = load_config(ROOT / "configs" / "llama3-8b.yaml")
    n = count_params(cfg.model)
    one, eight = memory_plan.plan(cfg, "ZeRO-3", 1, True), memory_plan.plan(cfg, "ZeRO-3", 8, True)
    assert eight.weights * 8 == one.weights == 2 * n and eight.optimizer * 8 == one.optimizer == 12 * n
    assert memory_plan.plan(cfg, "ZeRO-1", 8, True).weights == 2 * n  # only ZeRO-3 shards the weights
    ddp = memory_plan.plan(cfg, "DDP", 8, False)
    assert ddp.weights + ddp.grads + ddp.optimizer == 18 * n  # fp32 + autocast copies + gradients (bucket views) + AdamW
    assert memory_plan.plan(cfg, "ZeRO-1", 8, False).grads == 6 * n  # bf16 gradients + the whole fp32 accumulation
    assert ddp.activations == 2 * 4096 * 32 * memory_plan.activation_bytes_per_token_layer(cfg.model)
