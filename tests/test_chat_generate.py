"""A tiny model fine-tuned on a handful of conversations (the SFT samples and a plain loop, not the
training loop) answers them greedily through the chat template and stops at the end-of-sequence
token; ``distllm generate --chat`` does the same from the command line."""

import numpy as np
import pytest
import torch

from distllm.__main__ import main
from distllm.chat import load_chat_template
from distllm.config import ModelConfig
from distllm.data.instructions import Example, alpaca_messages
from distllm.data.packing import document_attention_mask
from distllm.data.sft import IGNORE, SFTDataset, tokenize_examples
from distllm.generate import chat_generate
from distllm.model import Transformer
from distllm.tokenizer import eot_id, fingerprint, save_tokenizer, train_tokenizer

STEPS = 100
PAIRS = [
    ("Name a colour.", "Red."),
    ("Add two and three.", "Five, of course."),
    ("Say hello in German.", "Hallo!"),
    ("Count to three.", "one two three"),
]


@pytest.fixture(scope="module")
def tuned():
    """(model, tokenizer, template): 2 layers fitted to PAIRS with the response-only loss."""
    examples = [Example(alpaca_messages(q, "", a), f"pairs[{i}]") for i, (q, a) in enumerate(PAIRS)]
    tok = train_tokenizer([" ".join(q + " " + a for q, a in PAIRS) * 20 + " ### Instruction: Response:"], 300)
    template = load_chat_template(None)
    ds = SFTDataset(tokenize_examples(examples, tok, template, 48), 48, eot_id(tok), packing=True)
    batch = {k: torch.from_numpy(v) for k, v in ds.read(np.arange(ds.num_samples)).items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only waits for its share on a busy machine
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, n_layers=2, n_heads=2, d_model=64, max_seq_len=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    mask = document_attention_mask(batch["doc_ids"])
    for step in range(STEPS):
        logits = model(batch["input_ids"], attn_mask=mask)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    assert loss.item() < 0.05
    return model.eval(), tok, template


def test_fine_tuned_model_answers_and_stops_at_eos(tuned):
    model, tok, template = tuned
    eos = eot_id(tok)
    for question, answer in PAIRS:
        reply, new = chat_generate(model, tok, template, [{"role": "user", "content": question}], max_new_tokens=40)
        assert reply == answer
        assert new[-1] == eos and eos not in new[:-1] and len(new) < 40  # stopped at the end-of-sequence token


def test_generate_chat_on_the_command_line(tuned, tmp_path, monkeypatch, capsys):
    model, tok, _ = tuned
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_tokenizer(tok, ckpt / "tokenizer.json")
    state = {"tokenizer_fingerprint": fingerprint(tok), "config": {}}  # no sft section: the default template
    monkeypatch.setattr("distllm.evaluate.load_for_inference", lambda cfg, spec: (model, state, ckpt))
    config = tmp_path / "run.yaml"
    config.write_text(f"run: {{dir: {tmp_path / 'run'}}}\n")
    question, answer = PAIRS[1]
    assert main(["generate", str(config), "--chat", "--prompt", question, "--temperature", "0",
                 "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out == answer + "\n"  # the reply alone: no prompt, no end-of-sequence text
    assert main(["generate", str(config), "--prompt", "Name", "--system", "x"]) == 2
    assert "--system needs --chat" in capsys.readouterr().err
