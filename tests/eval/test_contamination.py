"""The contamination check on a corpus with planted test items: items inserted whole are found, in the
right shard and document, 12-word fragments are not; the decontaminated shards hold none of them and
train; the source is never touched."""

import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from distllm.config import from_dict
from distllm.errors import ConfigError, DataError
from distllm.eval import contamination as C
from distllm.eval.progress import Progress
from distllm.eval.tasks import load_task
from distllm.tokenizer import load_tokenizer

ITEMS = [  # (context, choices, gold); sentences written for this test
    ("The lighthouse keeper climbed the spiral stairs every evening to polish the great brass lens before",
     ["the storm clouds rolled in from the western sea.", "breakfast."], 0),
    ("Quarterly reports showed that the small bakery on Elm Street had doubled its sales of sourdough",
     ["bricks.", "loaves after the new oven arrived in early spring."], 1),
    ("When the orchestra finished tuning, the conductor raised her baton and the audience fell completely",
     ["silent as the first notes of the overture drifted over the hall.", "asleep."], 0),
    ("Volunteers planted four hundred young oak trees along the riverbank so that future floods would",
     ["erode the soil far less than the ones that came before.", "sing."], 0),
    ("Engineers tested the suspension bridge with heavy trucks for three days before the city finally",
     ["opened it to cyclists and pedestrians on a sunny Monday morning.", "melted."], 0),
    ("Paris is the capital of", ["France.", "cheese."], 0),  # shorter than 13 words: looked for whole
    ("The zebra juggles", ["violet harmonicas.", "nothing."], 0),  # short, nowhere in the corpus
    ("A quiet fox crossed the frozen meadow at dawn while the village still slept beneath thick",
     ["blankets of fresh snow.", "soup."], 0),  # never planted
]
WHOLE = {0: "lighthouse", 2: "orchestra", 5: "capital"}  # item -> a word of it, planted whole
FRAGMENT = {1: 2, 3: 4}  # item -> words skipped before its planted 12-word fragment


def item_text(i: int) -> str:
    ctx, choices, gold = ITEMS[i]
    return f"{ctx} {choices[gold]}"


def planted_corpus(root: Path, tiny_corpus: Path) -> Path:
    """The tiny corpus's documents with items planted: whole (changed in case and punctuation, which
    normalization removes) or as 12-word fragments (which must not count)."""
    corpus = root / "corpus"
    corpus.mkdir()
    docs = [p.read_text(encoding="utf-8") for p in sorted(tiny_corpus.iterdir())][:-1]  # the stdlib documents
    for k, i in enumerate(WHOLE):
        text = item_text(i).upper().replace(" ", ",  ", 2) if k == 0 else item_text(i)  # "THE, LIGHTHOUSE, ..."
        d = 3 + 7 * k
        docs[d] = docs[d][:600] + f"\n{text}\n" + docs[d][600:]
    for k, (i, skip) in enumerate(FRAGMENT.items()):
        words = item_text(i).split()[skip : skip + 12]
        d = 5 + 11 * k
        docs[d] = docs[d][:300] + " unrelated words " + " ".join(words) + " more unrelated words " + docs[d][300:]
    for k, doc in enumerate(docs):
        (corpus / f"doc_{k:02d}.txt").write_text(doc, encoding="utf-8")
    return corpus


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_corpus):
    from distllm.data.prepare import prepare

    root = tmp_path_factory.mktemp("planted")
    corpus = planted_corpus(root, tiny_corpus)
    cfg = from_dict({"run": {"dir": str(root / "run")},
                     "data": {"source": str(corpus), "dir": str(root / "data"), "val_fraction": 0.02,
                              "shard_tokens": 3000, "seq_len": 32},
                     "tokenizer": {"vocab_size": 512},
                     "model": {"n_layers": 1, "n_heads": 2, "d_model": 32, "vocab_size": 512, "max_seq_len": 32},
                     "train": {"micro_batch_size": 4, "global_batch_size": 4, "max_steps": 3, "eval_every": 0,
                               "eval_batches": 1, "device": "cpu"},
                     "optim": {"warmup_steps": 1},
                     "logging": {"tensorboard": False, "progress": False}}).validate()
    prepare(cfg)
    task = root / "planted.jsonl"
    task.write_text("".join(json.dumps({"context": c, "choices": ch, "label": g}) + "\n" for c, ch, g in ITEMS))
    return {"cfg": cfg, "data": root / "data", "task": task, "root": root}


def documents(data_dir: Path, split: str = "train") -> list[tuple[str, int, str]]:
    """(shard file, document index, text) of every document, decoded the plain way (an independent reading)."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    tok = load_tokenizer(data_dir / "tokenizer.json")
    eot = manifest["tokenizer"]["eot_id"]
    tokens, owner = [], []
    for entry in manifest["splits"][split]["shards"]:
        t = np.fromfile(data_dir / entry["file"], dtype=manifest["dtype"], offset=64)
        tokens.append(t)
        owner += [entry["file"]] * len(t)
    tokens = np.concatenate(tokens)
    out, start = [], 0
    for end in np.flatnonzero(tokens == eot).tolist():
        out.append((owner[start], len(out), tok.decode(tokens[start:end].tolist())))
        start = end + 1
    return out


def normalized(text: str) -> str:
    return " ".join(re.sub(r"[!-/:-@\[-`{-~]", "", text.lower()).split())


def test_whole_items_are_found_in_their_shard_and_document_fragments_are_not(planted):
    docs = documents(planted["data"])
    assert len({shard for shard, _, _ in docs}) >= 3  # several shards, documents crossing them
    expected = {}  # item -> documents holding it whole (an independent search of the decoded text)
    for i in range(len(ITEMS)):
        where = [(s, d) for s, d, text in docs if normalized(item_text(i)) in normalized(text)]
        if where:
            expected[i] = where
    val = documents(planted["data"], "val")
    for i in WHOLE:  # each whole item is in a training document, or its document went to the val split
        assert i in expected or any(normalized(item_text(i)) in normalized(text) for _, _, text in val)
    assert set(expected) <= set(WHOLE) and len(expected) >= 2

    task = load_task(planted["task"])
    manifest = json.loads((planted["data"] / "manifest.json").read_text())
    stream = np.concatenate([np.fromfile(planted["data"] / e["file"], dtype=manifest["dtype"], offset=64)
                             for e in manifest["splits"]["train"]["shards"]])
    second = int(np.flatnonzero(stream == manifest["tokenizer"]["eot_id"])[0]) + 1  # where document 1 starts
    # small units: documents cross unit boundaries, and (the last) a unit starts exactly at a document
    for num_proc, unit in ((1, 1 << 20), (2, 700), (2, second)):
        report, dirty = C.check(str(planted["data"]), [task], num_proc=num_proc, progress=False, unit_tokens=unit)
        t = report["tasks"]["planted"]
        assert t["dirty_indices"] == sorted(expected), num_proc
        assert t["clean_indices"] == [i for i in range(len(ITEMS)) if i not in expected]
        for i, where in expected.items():
            entry = t["per_item"][i]
            assert entry["dirty"] and entry["fraction"] == 1.0
            assert [(h["shard"], h["document"]) for h in entry["hits"]] == where[: C.HITS_PER_ITEM]
            assert WHOLE[i] in entry["hits"][0]["excerpt"].lower() and "[" in entry["hits"][0]["excerpt"]
        for i in FRAGMENT:  # 12 of its words are in the corpus, no 13-gram
            assert not t["per_item"][i]["dirty"] and t["per_item"][i]["found"] == 0
        assert report["documents"] == len(docs) and report["dirty_documents"] == len({w for v in expected.values()
                                                                                      for w in v})
    assert "dirty" in C.summary(report) and "planted" in C.summary(report)

    # a fragment of 12 words does count with 12-grams
    report, _ = C.check(str(planted["data"]), [task], n=12, num_proc=1, progress=False)
    assert set(FRAGMENT) <= set(report["tasks"]["planted"]["dirty_indices"])


def test_decontaminated_shards_hold_no_item_keep_the_rest_and_train(planted, tmp_path, capsys):
    from distllm.__main__ import main
    from distllm.train import train

    source = planted["data"]
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in source.iterdir() if p.is_file()}
    out = tmp_path / "clean"
    config = tmp_path / "run.yaml"
    from distllm.config import save_config

    save_config(planted["cfg"], config)
    report_path = tmp_path / "report.json"
    assert main(["contamination", str(config), "--tasks", str(planted["task"]), "--out", str(report_path),
                 "--decontaminate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "planted" in printed and f"wrote {out}" in printed
    report = json.loads(report_path.read_text())
    dirty_items = report["tasks"]["planted"]["dirty_indices"]

    kept = documents(out)
    assert all(normalized(item_text(i)) not in normalized(text) for i in dirty_items for _, _, text in kept)
    original = documents(source)
    assert len(kept) == len(original) - report["dirty_documents"] > 0
    assert [t for _, _, t in kept] == [t for _, _, t in original
                                      if not any(normalized(item_text(i)) in normalized(t) for i in dirty_items)]
    assert documents(out, "val") == documents(source, "val")
    manifest = json.loads((out / "manifest.json").read_text())
    d = manifest["decontamination"]
    assert d["source_manifest_sha256"] == hashlib.sha256((source / "manifest.json").read_bytes()).hexdigest()
    assert d["documents_dropped"] == report["dirty_documents"] and d["n"] == 13
    assert d["tokens_dropped"] + manifest["splits"]["train"]["num_tokens"] == \
        json.loads((source / "manifest.json").read_text())["splits"]["train"]["num_tokens"]
    assert d["tasks"][0]["sha256"] == hashlib.sha256(planted["task"].read_bytes()).hexdigest()
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in source.iterdir() if p.is_file()}

    again, _ = C.check(str(out), [load_task(planted["task"])], num_proc=1, progress=False)
    assert again["tasks"]["planted"]["dirty"] == 0

    cfg = planted["cfg"]
    cfg.data.dir, cfg.run.dir = str(out), str(tmp_path / "run")
    result = train(cfg)  # the loader verifies every new shard against the new manifest
    assert result.step == 3 and result.checkpoint is not None

    with pytest.raises(ConfigError, match="not empty"):
        C.decontaminate(str(source), str(out), [], report, 3000)
    with pytest.raises(ConfigError, match="source data.dir"):
        C.decontaminate(str(source), str(source), [], report, 3000)


def test_eval_on_the_clean_subset_side_by_side(planted, tmp_path, capsys):
    from distllm.evaluate import clean_subsets, side_by_side

    task = load_task(planted["task"])
    report, _ = C.check(str(planted["data"]), [task], num_proc=1, progress=False)
    path = C.write_report(report, tmp_path / "r.json")
    clean = clean_subsets([task], str(path))
    assert clean["planted"] == report["tasks"]["planted"]["clean_indices"]
    table = side_by_side({"tasks": {"planted": {"items": 8, "acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25,
                                                "acc_norm_stderr": 0.1, "clean": {"items": 5, "acc": 0.4,
                                                "acc_stderr": 0.2, "acc_norm": 0.2, "acc_norm_stderr": 0.2}}}})
    assert "0.5000±0.1000" in table and "0.4000±0.2000" in table and table.splitlines()[1].split()[-1] == "3"
    other = tmp_path / "planted.jsonl"
    shutil.copy(planted["task"], other)
    with open(other, "a") as f:
        f.write(json.dumps({"context": "x", "choices": ["y"], "label": 0}) + "\n")
    with pytest.raises(DataError, match="checked another version"):
        clean_subsets([load_task(other)], str(path))


def test_progress_prints_plain_lines_when_not_a_terminal():
    stream = io.StringIO()  # not a terminal
    with Progress(1000, "contamination", enabled=True, interval=0.0, stream=stream) as bar:
        bar.update(250, extra=10_000)
        bar.update(750, extra=30_000)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 3  # two updates and the closing line
    assert lines[0].startswith("contamination: 25% (250.0 of 1.0 k tok)") and "ETA" in lines[0]
    assert lines[-1].startswith("contamination: 100%") and "B/s" in lines[-1]


def test_normalization_is_gpt3s():
    assert C.normalize("The  QUICK, brown-fox's \"jump\"!\n\tÜber") == [b"the", b"quick", b"brownfoxs", b"jump",
                                                                          "Über".encode()]
    assert C.ngrams([b"a", b"b", b"c"], 2) == [(b"a", b"b"), (b"b", b"c")]
    assert C.ngrams([b"a"], 13) == [(b"a",)] and C.ngrams([], 13) == []
