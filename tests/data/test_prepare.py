import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import distllm.data.prepare as prepare_module
from distllm.config import from_dict
from distllm.data.corpus import load_corpus, stdlib_files
from distllm.data.prepare import prepare, split_documents
from distllm.data.shards import HEADER_SIZE, open_shard, read_header, read_manifest, verify
from distllm.errors import DataError
from distllm.tokenizer import EOT, load_tokenizer


def make_config(source, data_dir, **data):
    return from_dict(
        {
            "data": {"source": str(source), "dir": str(data_dir), "val_fraction": 0.1, **data},
            "tokenizer": {"vocab_size": 300},
            "logging": {"progress": False},
        }
    )


def stream(data_dir, split):
    manifest = read_manifest(data_dir)
    return np.concatenate([open_shard(data_dir / s["file"]) for s in manifest["splits"][split]["shards"]])


def decoded_documents(data_dir, split):
    """Decode a split's token stream back into its documents (split at EOT)."""
    tok = load_tokenizer(data_dir / "tokenizer.json")
    tokens = stream(data_dir, split).tolist()
    eot = tok.token_to_id(EOT)
    assert tokens[-1] == eot
    docs, current = [], []
    for t in tokens:
        if t == eot:
            docs.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    return docs


def corpus_texts(corpus_dir):
    return [p.read_text(encoding="utf-8") for p in sorted(corpus_dir.glob("*.txt"))]


def test_manifest_counts_match_the_shards(prepared_data):
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
    assert manifest["splits"]["train"]["num_documents"] + manifest["splits"]["val"]["num_documents"] == 40
    assert manifest["splits"]["val"]["num_documents"] == 4


def test_streams_decode_to_the_documents(prepared_data, tiny_corpus):
    texts = corpus_texts(tiny_corpus)
    is_val = split_documents(len(texts), 0.1)
    assert decoded_documents(prepared_data, "train") == [t for t, v in zip(texts, is_val) if not v]
    assert decoded_documents(prepared_data, "val") == [t for t, v in zip(texts, is_val) if v]
    assert not set(decoded_documents(prepared_data, "train")) & set(decoded_documents(prepared_data, "val"))


def test_split_is_deterministic_and_bounded():
    np.testing.assert_array_equal(split_documents(1000, 0.01), split_documents(1000, 0.01))
    assert split_documents(1000, 0.01).sum() == 10
    assert split_documents(2, 0.01).sum() == 1  # at least one val document
    assert split_documents(3, 0.9).sum() == 2  # at least one train document
    with pytest.raises(DataError, match="at least 2"):
        split_documents(1, 0.1)


def test_small_shards_and_worker_processes_give_the_same_stream(prepared_data, tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "TASK_BYTES", 4096)  # many tasks, so the worker pool is used
    cfg = make_config(tiny_corpus, tmp_path / "out", shard_tokens=5000, num_proc=2)
    cfg.tokenizer.vocab_size = 512
    manifest = prepare(cfg)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["num_tokens"] <= 5000 for s in shards)
    assert [s["file"] for s in shards[:2]] == ["train_000000.bin", "train_000001.bin"]
    for split in ("train", "val"):
        np.testing.assert_array_equal(stream(tmp_path / "out", split), stream(prepared_data, split))
    verify(tmp_path / "out", check_hashes=True)

    # re-running rebuilds, removing the shards of the previous run
    cfg.data.shard_tokens = 1_000_000
    prepare(cfg)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json", "tokenizer.json", "train_000000.bin", "val_000000.bin"
    ]  # fmt: skip


def test_existing_tokenizer_path(prepared_data, tiny_corpus, tmp_path):
    cfg = make_config(tiny_corpus, tmp_path / "out")
    cfg.tokenizer.path = str(prepared_data / "tokenizer.json")
    manifest = prepare(cfg)
    assert manifest["tokenizer"] == read_manifest(prepared_data)["tokenizer"]
    np.testing.assert_array_equal(stream(tmp_path / "out", "train"), stream(prepared_data, "train"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_jsonl_source_with_text_field(tiny_corpus, tmp_path):
    texts = corpus_texts(tiny_corpus)[:12]
    write_jsonl(tmp_path / "a.jsonl", [{"id": i, "body": t} for i, t in enumerate(texts[:6])])
    write_jsonl(
        tmp_path / "b.jsonl", [{"id": i, "body": t} for i, t in enumerate(texts[6:])] + [{"id": 99, "body": "  "}]
    )
    manifest = prepare(make_config(tmp_path / "*.jsonl", tmp_path / "out", text_field="body"))
    assert manifest["splits"]["train"]["num_documents"] + manifest["splits"]["val"]["num_documents"] == 12
    docs = decoded_documents(tmp_path / "out", "train") + decoded_documents(tmp_path / "out", "val")
    assert sorted(docs) == sorted(texts)

    with pytest.raises(DataError, match=r"field 'content' not found.*a.jsonl.*body.*data.text_field"):
        prepare(make_config(tmp_path / "a.jsonl", tmp_path / "out2", text_field="content"))
    with pytest.raises(DataError, match=r"field 'id'.*not text"):
        prepare(make_config(tmp_path / "a.jsonl", tmp_path / "out2", text_field="id"))


def test_parquet_source_with_text_field(tiny_corpus, tmp_path):
    texts = corpus_texts(tiny_corpus)[:10]
    pq.write_table(pa.table({"content": texts, "n": list(range(10))}), tmp_path / "docs.parquet")
    manifest = prepare(make_config(tmp_path / "docs.parquet", tmp_path / "out", text_field="content"))
    docs = decoded_documents(tmp_path / "out", "train") + decoded_documents(tmp_path / "out", "val")
    assert sorted(docs) == sorted(texts) and manifest["splits"]["val"]["num_documents"] == 1
    with pytest.raises(DataError, match=r"field 'text' not found in .*docs.parquet"):
        prepare(make_config(tmp_path / "docs.parquet", tmp_path / "out"))


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


def test_corpus_edits_are_not_hidden_by_the_datasets_cache(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(f"document number {i}")
    assert load_corpus(make_config(corpus, tmp_path).data)["text"][1] == "document number 1"
    (corpus / "1.txt").write_text("edited")
    assert load_corpus(make_config(corpus, tmp_path).data)["text"][1] == "edited"


def test_max_documents_and_non_utf8(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "0.txt").write_bytes(b"caf\xe9 in latin-1")
    for i in range(1, 5):
        (corpus / f"{i}.txt").write_text(f"doc {i}")
    (corpus / ".hidden.txt").write_text("skipped")
    cfg = make_config(corpus, tmp_path)
    assert load_corpus(cfg.data)["text"] == ["caf\ufffd in latin-1", "doc 1", "doc 2", "doc 3", "doc 4"]
    cfg.data.max_documents = 2
    assert load_corpus(cfg.data)["text"] == ["caf\ufffd in latin-1", "doc 1"]


def test_python_stdlib_source():
    files = stdlib_files()
    assert len(files) > 300 and files == sorted(files)
    parts = {part for f in files for part in f.split(os.sep)}
    assert not parts & {"site-packages", "test", "tests", "idle_test"}
    assert any(f.endswith(os.sep + "os.py") for f in files)
    docs = load_corpus(make_config("python-stdlib", "unused", max_documents=3).data)
    assert len(docs) == 3 and all(isinstance(t, str) and t.strip() for t in docs["text"])


def test_malformed_or_empty_json(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match=r"could not read corpus .*bad.jsonl: JSON parse error"):
        load_corpus(make_config(tmp_path / "bad.jsonl", tmp_path).data)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"corpus .*empty.jsonl is empty"):
        load_corpus(make_config(tmp_path / "empty.jsonl", tmp_path).data)
