"""SFT samples: labels on exactly the response tokens and their end-of-sequence tokens, packed with
document ids or padded, truncation / dropping counted, a content-hash split, deterministic data_id."""

import json
import random

import numpy as np
import pytest

from distllm.chat import load_chat_template
from distllm.data.instructions import Example, alpaca_messages
from distllm.data.sft import (
    IGNORE,
    SFTDataset,
    build_sft_data,
    held_out_prompts,
    pack,
    split_examples,
    tokenize_examples,
)
from distllm.errors import ConfigError
from distllm.tokenizer import EOT, eot_id, train_tokenizer

EXAMPLES = [
    Example(alpaca_messages("Name a colour.", "", "Red."), "a"),
    Example(alpaca_messages("Add the numbers.", "2 3", "5"), "b"),
    Example([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye"},
             {"role": "assistant", "content": "Bye."}], "c"),
    Example(alpaca_messages("Say hello in German.", "", "Grüße! 🦙"), "d"),
    Example(alpaca_messages("Count.", "", "one two three four five six seven eight nine ten"), "e"),
]


@pytest.fixture(scope="module")
def tok():
    text = " ".join(m["content"] for e in EXAMPLES for m in e.messages)
    return train_tokenizer([text * 10, "### Instruction:\n### Input:\n### Response:\n" * 10], 320)


def responses(ex: Example) -> list[str]:
    return [m["content"] + EOT for m in ex.messages if m["role"] == "assistant"]


def labelled_runs(tok, labels: np.ndarray) -> list[str]:
    """Decoded runs of consecutive labelled positions."""
    runs, run = [], []
    for y in labels.tolist() + [IGNORE]:
        if y != IGNORE:
            run.append(y)
        elif run:
            runs.append(tok.decode(run, skip_special_tokens=False))
            run = []
    return runs


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_labels_are_the_response_tokens_and_their_eos(tok, packing):
    template = load_chat_template(None)
    T = 64
    ds = SFTDataset(tokenize_examples(EXAMPLES, tok, template, T), T, eot_id(tok), packing)
    batch = ds.read(np.arange(ds.num_samples))
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "input_ids": ((ds.num_samples, T), "int64"), "labels": ((ds.num_samples, T), "int64"),
        "doc_ids": ((ds.num_samples, T), "int32")}
    if packing:
        assert ds.num_samples < len(EXAMPLES)  # several examples share a row
    found = []
    for x, y, d in zip(batch["input_ids"], batch["labels"], batch["doc_ids"]):
        assert (np.diff(d) >= 0).all()  # documents are contiguous runs 0, 1, ...
        for doc in np.unique(d):
            at = d == doc
            text = tok.decode(x[at].tolist(), skip_special_tokens=False)
            if not (y[at] != IGNORE).any():  # padding: end-of-sequence ids, nothing learned
                assert (x[at] == eot_id(tok)).all() and doc == d.max()
                continue
            found.append((text, labelled_runs(tok, y[at])))
            # each label is the next input of the same example (the last one is its final end-of-sequence)
            xs, ys = x[at], y[at]
            learned = np.flatnonzero(ys[:-1] != IGNORE)
            assert (ys[learned] == xs[learned + 1]).all() and ys[-1] == eot_id(tok)
    template_texts = {template.render(e.messages)[: -len(EOT)]: responses(e) for e in EXAMPLES}
    assert sorted(found) == sorted(template_texts.items())  # every example once: its prompt text, its answers


def test_padding_with_the_eos_id_keeps_the_real_eos_learned(tok):
    """Padding uses the end-of-sequence id, yet each assistant turn's end-of-sequence token keeps its label
    (TRL #1623: masking labels by the padding id would unlearn stopping)."""
    eos = eot_id(tok)
    ds = SFTDataset(tokenize_examples(EXAMPLES, tok, load_chat_template(None), 64), 64, eos, packing=False)
    batch = ds.read(np.arange(ds.num_samples))
    assert (batch["input_ids"] == eos).sum() > 5 * len(EXAMPLES)  # mostly padding
    assert (batch["labels"] == eos).sum() == sum(len(responses(e)) for e in EXAMPLES)  # 6 turns, 6 learned EOS


def test_overlong_examples_are_truncated_or_dropped_and_counted(tok):
    template = load_chat_template(None)
    lengths = [len(template.encode(tok, e.messages).ids) for e in EXAMPLES]
    T = sorted(lengths)[-2] - 2  # the two longest examples do not fit
    cut = tokenize_examples(EXAMPLES, tok, template, T, "truncate")
    assert (cut.truncated, cut.dropped, cut.num_examples) == (2, 0, 5)
    assert cut.lengths().max() == T + 1
    dropped = tokenize_examples(EXAMPLES, tok, template, T, "drop")
    assert (dropped.truncated, dropped.dropped, dropped.num_examples) == (0, 2, 3)
    # a prompt longer than the sequence: nothing left to learn, dropped even when truncating
    tiny = tokenize_examples(EXAMPLES, tok, template, 4, "truncate")
    assert tiny.dropped == 5 and tiny.num_examples == 0
    assert SFTDataset(cut, T, 0).stats()["truncated"] == 2
    with pytest.raises(ConfigError, match="sft.overlong"):
        tokenize_examples(EXAMPLES, tok, template, T, "shorten")


def test_best_fit_decreasing_packing():
    assert pack(np.array([6, 4, 5, 5]), 10) == [[0, 1], [2, 3]]
    assert pack(np.array([7, 2, 3, 8]), 10) == [[1, 3], [0, 2]]  # 8 first, then 7, then 3 and 2 fill the gaps
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 33, 500)
    rows = pack(sizes, 32)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sizes[r].sum() <= 32 for r in rows)
    lower = max(np.ceil(sizes.sum() / 32), (sizes > 16).sum())  # no two items over 16 share a row
    assert len(rows) <= 1.05 * lower
    assert rows == pack(sizes, 32)
    small = rng.integers(1, 17, 500)
    assert len(pack(small, 32)) == np.ceil(small.sum() / 32)  # small items: every row full but the last


def test_split_is_by_content_and_data_id_is_deterministic(tok):
    examples = [Example(alpaca_messages(f"Question {i}?", "", f"Answer {i}."), f"x:{i}") for i in range(60)]
    train, val = split_examples(examples, 0.2, "test")
    assert 4 <= len(val) <= 20 and len(train) + len(val) == 60
    shuffled = examples[:]
    random.Random(1).shuffle(shuffled)
    _, val2 = split_examples(shuffled, 0.2, "test")
    assert sorted(e.where for e in val2) == sorted(e.where for e in val)  # the same texts, whatever the order

    template = load_chat_template(None)
    def dataset(seq_len=32, packing=True):
        return SFTDataset(tokenize_examples(train, tok, template, seq_len), seq_len, eot_id(tok), packing)
    a, b = dataset(), dataset()
    assert a.data_id == b.data_id
    ids = np.array([3, 0, 3])
    assert all(np.array_equal(a.read(ids)[k], b.read(ids)[k]) for k in ("input_ids", "labels", "doc_ids"))
    assert len({a.data_id, dataset(packing=False).data_id, dataset(seq_len=48).data_id}) == 3
    with pytest.raises(IndexError):
        a.read(np.array([a.num_samples]))


def test_held_out_prompts_end_before_the_last_answer():
    prompts = held_out_prompts(EXAMPLES, 3)
    assert [p.reference for p in prompts] == ["Red.", "5", "Bye."]
    assert prompts[2].messages == EXAMPLES[2].messages[:4] and prompts[2].where == "c"


def test_build_from_a_file(tok, tmp_path, caplog):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                            for i in range(40)))
    with caplog.at_level("INFO", logger="distllm"):
        data = build_sft_data(str(path), tok, load_chat_template(None), 64, val_fraction=0.2, eval_prompts=2)
    assert data.train.stats()["examples"] + data.val.stats()["examples"] == 40
    assert len(data.prompts) == 2 and data.prompts[0].reference.startswith("Answer ")
    assert "sft train: " in caplog.text and "truncated" in caplog.text
