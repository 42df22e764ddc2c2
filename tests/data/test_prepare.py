"""``distllm prepare``: what the shards hold, the split, the sources, and corpus errors.

Resume after an interruption: test_prepare_resume.py; refusals, not-text input and dedup:
test_prepare_safety.py; object-storage output: test_prepare_s3.py.
"""

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prepared import corpus_texts, decoded_documents, expected_split, file_bytes, make_config, stream

import distllm.data.prepare as prepare_module
import distllm.data.workers as workers_module
from distllm.data import dedup
from distllm.data.corpus import load_corpus, stdlib_files
from distllm.data.prepare import prepare
from distllm.data.shards import HEADER_SIZE, read_header, read_manifest, verify
from distllm.errors import DataError


def test_manifest_counts_match_the_shards(prepared_data, tiny_corpus):
    manifest = verify(prepared_data, check_hashes=True)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 512
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        assert entry["num_tokens"] == sum(read_header(prepared_data / s["file"]).num_tokens for s in entry["shards"])
        for s in entry["shards"]:
            assert (prepared_data / s["file"]).stat().st_size == HEADER_SIZE + 2 * s["num_tokens"]
        tokens = stream(prepared_data, split)
        assert len(tokens) == entry["num_tokens"]
        # one EOT per document, even though one document contains the text "<|endoftext|>"
        assert (tokens == manifest["tokenizer"]["eot_id"]).sum() == entry["num_documents"]
    train, val = expected_split(corpus_texts(tiny_corpus))
    assert manifest["splits"]["train"]["num_documents"] == len(train) == 40 - len(val)
    assert manifest["splits"]["val"]["num_documents"] == len(val) >= 1
    assert manifest["prepare"]["documents"] == 40 and manifest["prepare"]["not_text"]["count"] == 0
    assert not (prepared_data / ".prepare").exists()  # the work directory is removed when done


def test_streams_decode_to_the_documents(prepared_data, tiny_corpus):
    train, val = expected_split(corpus_texts(tiny_corpus))
    assert decoded_documents(prepared_data, "train") == train
    assert decoded_documents(prepared_data, "val") == val
    assert not set(train) & set(val)


def test_split_depends_on_each_text_alone(prepared_data, tiny_corpus, tmp_path):
    """A document's split does not depend on the other documents, their order or their number."""
    texts = corpus_texts(tiny_corpus)
    _, val = expected_split(texts)
    subset = tmp_path / "subset"
    subset.mkdir()
    kept = texts[::2] + [v for v in val if v not in texts[::2]]  # every val document and half of the rest
    for i, text in enumerate(reversed(kept)):  # another order, other names
        (subset / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    prepare(make_config(subset, tmp_path / "out", tokenizer={"vocab_size": 512}))
    assert sorted(decoded_documents(tmp_path / "out", "val")) == sorted(val)


def test_split_threshold_keeps_both_splits_non_empty():
    base = dedup.base_threshold(0.1)
    assert dedup.split_threshold(0.1, 3, 40, 5, 2**64 - 9, "c") == base
    assert dedup.split_threshold(0.1, 0, 40, 2**63, 2**64 - 9, "c") == 2**63 + 1  # smallest hash -> val
    assert dedup.split_threshold(0.9, 3, 3, 5, 2**60, "c") == 2**60  # largest hash -> train
    with pytest.raises(DataError, match="has 1 non-empty document; need at least 2"):
        dedup.split_threshold(0.1, 0, 1, 5, 5, "c")
    with pytest.raises(DataError, match="only one distinct text"):
        dedup.split_threshold(0.1, 0, 3, 5, 5, "c")


def test_two_documents_make_one_train_and_one_val(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("the first document")
    (tmp_path / "c" / "b.txt").write_text("another one")
    manifest = prepare(make_config(tmp_path / "c", tmp_path / "out", val_fraction=0.01))
    assert [manifest["splits"][s]["num_documents"] for s in ("train", "val")] == [1, 1]


def test_processes_pieces_and_shard_size_do_not_change_the_stream(prepared_data, tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "MIN_PIECE_BYTES", 4096)  # several pieces, so the worker pool is used
    builds = {}
    for num_proc in (1, 2):
        out = tmp_path / f"out{num_proc}"
        cfg = make_config(tiny_corpus, out, tokenizer={"vocab_size": 512}, shard_tokens=5000, num_proc=num_proc)
        manifest = prepare(cfg)
        shards = manifest["splits"]["train"]["shards"]
        assert len(shards) > 2 and all(s["num_tokens"] == 5000 for s in shards[:-1])
        assert [s["file"] for s in shards[:2]] == ["train_000000.bin", "train_000001.bin"]
        verify(out, check_hashes=True)
        builds[num_proc] = file_bytes(out)
        for split in ("train", "val"):  # one piece and 50M-token shards in the fixture: the same stream
            np.testing.assert_array_equal(stream(out, split), stream(prepared_data, split))
    assert builds[1] == builds[2]


def test_long_documents_are_encoded_in_parts_with_the_same_ids(tmp_path, tiny_corpus, monkeypatch):
    corpus = tmp_path / "long"
    corpus.mkdir()
    (corpus / "a.txt").write_text(" ".join(corpus_texts(tiny_corpus)[:8]), encoding="utf-8")  # ~16k characters
    (corpus / "b.txt").write_text(corpus_texts(tiny_corpus)[-1], encoding="utf-8")
    cfg = make_config(corpus, tmp_path / "whole")
    prepare(cfg)
    calls = []
    original = workers_module.split_long
    monkeypatch.setattr(workers_module, "split_long", lambda t, n: calls.append(len(t)) or original(t, n))
    monkeypatch.setattr(workers_module, "LONG_DOC_CHARS", 500)
    cfg = make_config(corpus, tmp_path / "parts", tokenizer={"path": str(tmp_path / "whole" / "tokenizer.json")})
    prepare(cfg)
    assert max(calls) > 10_000 and len(original(" ".join(corpus_texts(tiny_corpus)[:8]), 500)) > 20
    for split in ("train", "val"):
        np.testing.assert_array_equal(stream(tmp_path / "parts", split), stream(tmp_path / "whole", split))


def test_existing_tokenizer_path(prepared_data, tiny_corpus, tmp_path):
    cfg = make_config(tiny_corpus, tmp_path / "out", tokenizer={"path": str(prepared_data / "tokenizer.json")})
    manifest = prepare(cfg)
    assert manifest["tokenizer"] == read_manifest(prepared_data)["tokenizer"]
    np.testing.assert_array_equal(stream(tmp_path / "out", "train"), stream(prepared_data, "train"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_jsonl_source_with_text_field(tiny_corpus, tmp_path, monkeypatch):
    texts = corpus_texts(tiny_corpus)[:12]
    write_jsonl(tmp_path / "a.jsonl", [{"id": i, "body": t} for i, t in enumerate(texts[:6])])
    write_jsonl(
        tmp_path / "b.jsonl", [{"id": i, "body": t} for i, t in enumerate(texts[6:])] + [{"id": 99, "body": "  "}]
    )
    manifest = prepare(make_config(tmp_path / "*.jsonl", tmp_path / "out", text_field="body"))
    assert manifest["splits"]["train"]["num_documents"] + manifest["splits"]["val"]["num_documents"] == 12
    docs = decoded_documents(tmp_path / "out", "train") + decoded_documents(tmp_path / "out", "val")
    assert sorted(docs) == sorted(texts)

    # a large .jsonl file is cut at byte offsets into pieces: every line is read exactly once
    monkeypatch.setattr(prepare_module, "MIN_PIECE_BYTES", 1000)
    prepare(make_config(tmp_path / "*.jsonl", tmp_path / "pieces", text_field="body", num_proc=2))
    assert file_bytes(tmp_path / "pieces") == file_bytes(tmp_path / "out")

    with pytest.raises(DataError, match=r"field 'content' not found.*a.jsonl.*body.*data.text_field"):
        prepare(make_config(tmp_path / "a.jsonl", tmp_path / "out2", text_field="content"))
    with pytest.raises(DataError, match=r"field 'id'.*not text"):
        prepare(make_config(tmp_path / "a.jsonl", tmp_path / "out2", text_field="id"))


def test_json_array_source(tiny_corpus, tmp_path):
    texts = corpus_texts(tiny_corpus)[:5]
    (tmp_path / "docs.json").write_text(json.dumps([{"text": t} for t in texts] + [{"text": None}]))
    manifest = prepare(make_config(tmp_path / "docs.json", tmp_path / "out"))
    assert manifest["prepare"]["documents"] == 5 and manifest["prepare"]["empty_documents"] == 1
    docs = decoded_documents(tmp_path / "out", "train") + decoded_documents(tmp_path / "out", "val")
    assert sorted(docs) == sorted(texts)


def test_parquet_source_with_text_field(tiny_corpus, tmp_path):
    texts = corpus_texts(tiny_corpus)[:10]
    pq.write_table(pa.table({"content": texts, "n": list(range(10))}), tmp_path / "docs.parquet", row_group_size=3)
    manifest = prepare(make_config(tmp_path / "docs.parquet", tmp_path / "out", text_field="content"))
    docs = decoded_documents(tmp_path / "out", "train") + decoded_documents(tmp_path / "out", "val")
    assert sorted(docs) == sorted(texts) and manifest["prepare"]["documents"] == 10
    with pytest.raises(DataError, match=r"field 'text' not found in .*docs.parquet"):
        prepare(make_config(tmp_path / "docs.parquet", tmp_path / "out"))
    with pytest.raises(DataError, match=r"field 'n' in .*docs.parquet holds int64, not text"):
        prepare(make_config(tmp_path / "docs.parquet", tmp_path / "out", text_field="n"))


def test_missing_corpus_names_the_path(tmp_path):
    for source, message in [
        (tmp_path / "nope", "corpus not found: .*nope"),
        (tmp_path / "nope.txt", "corpus not found: .*nope.txt"),
        (tmp_path / "*.jsonl", r"no files match the corpus pattern .*\*.jsonl"),
    ]:
        with pytest.raises(DataError, match=message):
            prepare(make_config(source, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("")
    (tmp_path / "corpus" / "b.txt").write_text("  \n\t\n")
    with pytest.raises(DataError, match="corpus .*corpus is empty"):
        prepare(make_config(tmp_path / "corpus", tmp_path / "out"))
    assert not (tmp_path / "out" / ".prepare").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("not a corpus file")
    with pytest.raises(DataError, match="no .txt, .jsonl, .json, .parquet files in corpus directory .*other"):
        prepare(make_config(tmp_path / "other", tmp_path / "out"))


def test_single_document_corpus(tmp_path):
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(DataError, match="one.txt has 1 non-empty document; need at least 2"):
        prepare(make_config(tmp_path / "one.txt", tmp_path / "out"))


def test_unreachable_hub_dataset(tmp_path):
    start = time.perf_counter()
    with pytest.raises(
        DataError, match=r"could not load Hugging Face dataset 'someone/no-such-set'.*offline\? use a local path"
    ):
        prepare(make_config("hf:someone/no-such-set", tmp_path / "out"))
    assert time.perf_counter() - start < 5  # HF_HUB_OFFLINE: fails at once instead of retrying


def test_hub_dataset_is_streamed_and_spooled(tiny_corpus, tmp_path, monkeypatch):
    """A Hub dataset is read with streaming=True (here: served by a local JSON-lines stream)."""
    import datasets

    texts = corpus_texts(tiny_corpus)
    write_jsonl(tmp_path / "hub.jsonl", [{"body": t} for t in texts])
    calls = []
    original = datasets.load_dataset

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return original("json", data_files=str(tmp_path / "hub.jsonl"), split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    manifest = prepare(make_config("hf:someone/corpus", tmp_path / "out", text_field="body", max_documents=30,
                                   hf_config="en", tokenizer={"vocab_size": 512}))  # fmt: skip
    assert calls == [("someone/corpus", "en", "train", True)]
    assert manifest["prepare"]["documents"] == 30
    docs = decoded_documents(tmp_path / "out", "train") + decoded_documents(tmp_path / "out", "val")
    assert sorted(docs) == sorted(texts[:30])
    assert not (tmp_path / "out" / ".prepare").exists()  # the spool is removed


def test_max_documents(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "MIN_PIECE_BYTES", 4096)
    manifest = prepare(make_config(tiny_corpus, tmp_path / "out", max_documents=25, num_proc=2))
    assert manifest["prepare"]["documents"] == 25
    docs = decoded_documents(tmp_path / "out", "train") + decoded_documents(tmp_path / "out", "val")
    assert sorted(docs) == sorted(corpus_texts(tiny_corpus)[:25])


def test_load_corpus_streams_documents(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"{i}.txt").write_text(f"doc {i}")
    (corpus / "5.txt").write_text(" \n")
    (corpus / ".hidden.txt").write_text("skipped")
    cfg = make_config(corpus, tmp_path)
    assert list(load_corpus(cfg.data)) == ["doc 0", "doc 1", "doc 2", "doc 3", "doc 4"]
    cfg.data.max_documents = 2
    assert list(load_corpus(cfg.data)) == ["doc 0", "doc 1"]


def test_python_stdlib_source():
    files = stdlib_files()
    assert len(files) > 300 and files == sorted(files)
    parts = {part for f in files for part in f.split(os.sep)}
    assert not parts & {"site-packages", "test", "tests", "idle_test"}
    assert any(f.endswith(os.sep + "os.py") for f in files)
    docs = list(load_corpus(make_config("python-stdlib", "unused", max_documents=3).data))
    assert len(docs) == 3 and all(isinstance(t, str) and t.strip() for t in docs)


def test_malformed_or_empty_json(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match=r"could not read corpus .*bad.jsonl: JSON parse error at byte 17"):
        prepare(make_config(tmp_path / "bad.jsonl", tmp_path / "out"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"corpus .*empty.jsonl is empty"):
        prepare(make_config(tmp_path / "empty.jsonl", tmp_path / "out"))
