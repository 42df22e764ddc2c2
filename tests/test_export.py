"""``distllm export``: a trained checkpoint as a Hugging Face Llama directory that ``transformers``
loads with no custom code, with the same logits (1e-4) and the same greedy text as distllm."""

import json
import os
from pathlib import Path

import pytest
import torch

from distllm import checkpoint
from distllm.__main__ import main
from distllm.chat import CHECKPOINT_TEMPLATE_FILE, DEFAULT_CHAT_TEMPLATE, load_chat_template
from distllm.config import from_dict
from distllm.errors import CheckpointError, ConfigError, DataError
from distllm.export import export
from distllm.generate import generate
from distllm.model import Transformer
from distllm.tokenizer import eot_id, load_tokenizer
from distllm.train import train


transformers = pytest.importorskip("transformers")

PROMPTS = [  # with the generated tokens, each fits max_seq_len (64): no cropping on either side
    "def parse(self, text):\n    ",
    "Module json\n\nJSON encoder",
    "Grüße aus Köln — naïve c",  # from the tiny corpus's multilingual document (tests/conftest.py)
    "may mention <|endoftext|> literally",  # plain text to distllm's tokenizer, and to the exported one
]


def train_tiny(cfg, tie: bool, n_kv_heads: int, steps: int = 12):
    """A few steps of real training (peaked enough for greedy decoding to have no near-ties)."""
    cfg.model.tie_embeddings, cfg.model.n_heads, cfg.model.n_kv_heads = tie, 4, n_kv_heads
    cfg.model.rope_theta = 500.0  # not HF's default: the export must carry it
    cfg.train.max_steps, cfg.train.eval_every = steps, 0
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, min(2, steps - 1)
    return train(cfg)


def distllm_model(ckpt: Path):
    state = checkpoint.read_state(ckpt)
    model = Transformer(from_dict({"model": state["config"]["model"]}).model)
    checkpoint.load_weights(ckpt, model)
    return model.eval()


def assert_parity(ckpt: Path, out: Path, tok_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = distllm_model(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    hf_tok = AutoTokenizer.from_pretrained(out)
    tok = load_tokenizer(tok_path)
    eot = eot_id(tok)
    worst = 0.0
    for text in PROMPTS:
        ids = tok.encode(text).ids
        assert len(ids) + 24 <= ours.cfg.max_seq_len, len(ids)
        assert hf_tok(text)["input_ids"] == ids, text  # the same tokens, "<|endoftext|>" text included
        x = torch.tensor([ids])
        with torch.no_grad():
            a, b = ours(x), hf(x).logits
        worst = max(worst, (a - b).abs().max().item())
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)

        greedy = generate(ours, ids, 24, temperature=0, eos_id=eot)[0].tolist()
        hf_greedy = hf.generate(x, max_new_tokens=24, do_sample=False, eos_token_id=eot, pad_token_id=eot)[0].tolist()
        assert hf_greedy == greedy, text
        assert hf_tok.decode(hf_greedy, skip_special_tokens=True) == tok.decode(greedy, skip_special_tokens=True)
    print(f"max |logit difference| {worst:.2e}")


@pytest.mark.parametrize("tie, n_kv_heads", [(True, 2), (False, 1), (False, 4)], ids=["tied-gqa", "untied-mqa", "untied-mha"])
def test_export_round_trip_through_transformers(tiny_config, tmp_path, tie, n_kv_heads):
    result = train_tiny(tiny_config, tie, n_kv_heads)
    out = tmp_path / "hf"
    assert main(["export", str(result.checkpoint.parent.parent), "--out", str(out)]) == 0  # the run directory
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= files
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tie
    umask = os.umask(0o022)
    os.umask(umask)
    for p in [*out.iterdir(), *result.checkpoint.iterdir()]:  # a teammate can read the export and the checkpoint
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, (p.name, oct(p.stat().st_mode))
    assert_parity(result.checkpoint, out, Path(tiny_config.data.dir) / "tokenizer.json")
    assert_chat_template(out, DEFAULT_CHAT_TEMPLATE)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße, <|endoftext|>?"},
        {"role": "assistant", "content": "Hallo."}, {"role": "user", "content": "def f():"}]


def assert_chat_template(out: Path, source: str) -> None:
    """The export carries the chat template, and transformers renders with it what distllm renders."""
    from transformers import AutoTokenizer

    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == source
    hf = AutoTokenizer.from_pretrained(out)
    ours = load_chat_template(source)
    for n in (2, 3, 4):
        assert hf.apply_chat_template(CHAT[:n], tokenize=False, add_generation_prompt=True) == ours.render(CHAT[:n], True)


def test_export_of_a_checkpoint_dir_in_shards_and_bf16(tiny_config, tmp_path):
    from safetensors import safe_open

    result = train_tiny(tiny_config, tie=False, n_kv_heads=2, steps=2)
    out = export(result.checkpoint, tmp_path / "sharded", max_shard_gb=40e3 / 1e9)  # ~40 kB shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == shards
    assert_parity(result.checkpoint, out, Path(tiny_config.data.dir) / "tokenizer.json")

    half = export(result.checkpoint, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(half / "model.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"

    # the chat template: the checkpoint's own, else the default; --chat-template overrides it
    custom = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}" \
             "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    (result.checkpoint / CHECKPOINT_TEMPLATE_FILE).write_text(custom)
    assert_chat_template(export(result.checkpoint, tmp_path / "own-template", max_shard_gb=1), custom)
    (tmp_path / "t.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
    assert main(["export", str(result.checkpoint), "--out", str(tmp_path / "cli"), "--chat-template",
                 str(tmp_path / "t.jinja")]) == 0
    assert_chat_template(tmp_path / "cli", DEFAULT_CHAT_TEMPLATE)


def test_export_refuses_bad_targets_with_one_clear_error(tiny_config, tmp_path, capsys):
    result = train_tiny(tiny_config, tie=True, n_kv_heads=2, steps=1)
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        export(tmp_path / "empty-run", tmp_path / "a")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(ConfigError, match="not empty"):
        export(result.checkpoint, tmp_path / "busy")
    with pytest.raises(ConfigError, match="--dtype"):
        export(result.checkpoint, tmp_path / "b", dtype="int8")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    # no tokenizer copy in the checkpoint: data.dir's is used, and must be the same tokenizer
    ckpt = result.checkpoint
    (ckpt / "tokenizer.json").unlink()
    other = tmp_path / "other-data"
    other.mkdir()
    (other / "tokenizer.json").write_text(load_tokenizer(Path(tiny_config.data.dir) / "tokenizer.json").to_str()
                                          .replace('"<|endoftext|>"', '"<|end|>"', 1))
    state = json.loads((ckpt / "state.json").read_text())
    state["config"]["data"]["dir"] = str(other)
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises((DataError, CheckpointError)):
        export(ckpt, tmp_path / "c")
    assert not (tmp_path / "c").exists()

    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")]) == 2  # one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distllm export: error:")


def test_export_from_a_zero3_checkpoint_of_two_ranks(dist_runs, tmp_path):
    """A checkpoint written by 2 ZeRO-3 ranks (each rank's own parameters in its own file) exports
    in one CPU process, without DeepSpeed or the ranks that wrote it, to the same HF model."""
    run = dist_runs["zero3"]
    ckpt = run.checkpoint()
    assert len(list(ckpt.glob("model-rank*.safetensors"))) == 2 and not (ckpt / "model.safetensors").exists()
    out = tmp_path / "hf"
    assert main(["export", str(run.dir), "--out", str(out)]) == 0
    assert_parity(ckpt, out, ckpt / "tokenizer.json")
