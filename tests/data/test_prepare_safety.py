"""``distllm prepare`` never destroys data by accident, never tokenizes what is not text, and drops
exact duplicates when asked."""

import logging
import os
import shutil

import numpy as np
import pytest
from prepared import corpus_texts, decoded_documents, expected_split, file_bytes, make_config

import distllm.data.dedup as dedup_module
import distllm.data.prepare as prepare_module
from distllm.__main__ import main
from distllm.data.prepare import prepare
from distllm.data.shards import MANIFEST, read_manifest, verify
from distllm.errors import DataError
from distllm.tokenizer import fingerprint, load_tokenizer


def snapshot(data_dir):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(data_dir.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- existing data directories


def test_prepared_directory_is_not_overwritten_by_accident(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "data"
    cfg = make_config(tiny_corpus, out, shard_tokens=4000)
    prepare(cfg)
    before = snapshot(out)

    # the same settings and files: nothing to do, nothing touched
    assert prepare(cfg) == read_manifest(out)
    assert snapshot(out) == before

    # other settings: refused, with one line naming the key to set; nothing touched
    other = make_config(tiny_corpus, out, shard_tokens=100_000, tokenizer={"vocab_size": 320})
    with pytest.raises(DataError, match=r"already holds a prepared dataset .*set data.overwrite=true"):
        prepare(other)
    assert snapshot(out) == before
    config = tmp_path / "prepare.yaml"
    config.write_text(f"data: {{source: {tiny_corpus}, dir: {out}}}\nlogging: {{progress: false}}\n")
    assert main(["prepare", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.overwrite=true" in err and str(out) in err
    assert snapshot(out) == before

    # an edited corpus file counts as another corpus
    edited = tmp_path / "edited"
    shutil.copytree(tiny_corpus, edited)
    prepare(make_config(edited, tmp_path / "e"))
    (edited / "doc_00_argparse.txt").write_text("an edited document")
    with pytest.raises(DataError, match="data.overwrite=true"):
        prepare(make_config(edited, tmp_path / "e"))

    # asked for: replaced, and the shards of the old, larger build are removed
    other.data.overwrite = True
    manifest = prepare(other)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "tokenizer.json", "train_000000.bin", "val_000000.bin"]
    assert manifest["tokenizer"]["vocab_size"] == 320
    verify(out, check_hashes=True)


def test_a_different_tokenizer_is_never_replaced_without_overwrite(tiny_corpus, tmp_path):
    """A tokenizer.json without a manifest (an unfinished build of other settings, or one put there
    by hand) is kept unless data.overwrite is set."""
    out = tmp_path / "data"
    prepare(make_config(tiny_corpus, out))
    (out / MANIFEST).unlink()
    for p in out.glob("*.bin"):
        p.unlink()
    old = (out / "tokenizer.json").read_bytes()
    with pytest.raises(DataError, match=r"tokenizer.json exists and differs .*data.overwrite=true.*tokenizer.path="):
        prepare(make_config(tiny_corpus, out, tokenizer={"vocab_size": 320}))
    assert (out / "tokenizer.json").read_bytes() == old and not list(out.glob("*.bin"))

    # reusing it, as the message suggests, works
    prepare(make_config(tiny_corpus, out, tokenizer={"path": str(out / "tokenizer.json")}))
    assert (out / "tokenizer.json").read_bytes() == old
    (out / MANIFEST).unlink()

    cfg = make_config(tiny_corpus, out, tokenizer={"vocab_size": 320}, overwrite=True)
    prepare(cfg)
    assert load_tokenizer(out / "tokenizer.json").get_vocab_size() == 320


def test_the_tokenizer_of_checkpoints_is_never_replaced(tiny_config, prepared_data, tmp_path):
    """Even with data.overwrite, a tokenizer that complete checkpoints of run.dir were trained with stays."""
    from distllm.train import train

    data = tmp_path / "data"
    shutil.copytree(prepared_data, data)
    cfg = tiny_config
    cfg.data.dir, cfg.train.max_steps, cfg.train.eval_every = str(data), 3, 0
    train(cfg)
    before = snapshot(data)
    again = make_config(cfg.data.source, data, tokenizer={"vocab_size": 320}, run_dir=cfg.run.dir, overwrite=True)
    with pytest.raises(DataError, match=r"tokenizer.json is the tokenizer of the checkpoints in .*another data.dir"):
        prepare(again)
    assert snapshot(data) == before  # the manifest and shards are untouched too
    assert fingerprint(load_tokenizer(data / "tokenizer.json")) == read_manifest(data)["tokenizer"]["fingerprint"]


# --------------------------------------------------------------------------- input that is not text


def test_binary_and_non_utf8_files_are_reported_and_skipped(tiny_corpus, tmp_path, caplog):
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    rng = np.random.default_rng(0)
    for name in ("image.txt", "archive.txt", "model.txt"):
        (corpus / name).write_bytes(b"\x89PNG\r\n\x1a\n\0\0" + rng.bytes(3000))
    (corpus / "latin1.txt").write_bytes("café crème, naïve façade".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="distllm"):
        manifest = prepare(make_config(corpus, tmp_path / "out"))
    bad = {"archive.txt", "image.txt", "latin1.txt", "model.txt"}
    assert manifest["prepare"]["not_text"]["count"] == 4
    assert {os.path.basename(p) for p in manifest["prepare"]["not_text"]["examples"]} == bad
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipped 4 files or records" in warning and all(name in warning for name in bad)
    docs = decoded_documents(tmp_path / "out", "train") + decoded_documents(tmp_path / "out", "val")
    assert sorted(docs) == sorted(corpus_texts(tiny_corpus))  # exactly the text files, nothing else


def test_bad_jsonl_records_are_skipped(tmp_path):
    lines = [b'{"text": "a first document"}', b'{"text": "caf\xe9"}', b'{"text": "a second one"}',
             b'{"text": "nul \\u0000 inside"}', b'{"text": "third"}']  # fmt: skip
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    manifest = prepare(make_config(tmp_path / "docs.jsonl", tmp_path / "out"))
    assert manifest["prepare"]["documents"] == 3 and manifest["prepare"]["not_text"]["count"] == 2
    docs = decoded_documents(tmp_path / "out", "train") + decoded_documents(tmp_path / "out", "val")
    assert sorted(docs) == ["a first document", "a second one", "third"]


def test_bad_parquet_rows_are_skipped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [b"a first document", b"caf\xe9", b"a second one", b"nul \x00 inside", b"third"]
    offsets = np.cumsum([0] + [len(t) for t in texts]).astype(np.int32)
    column = pa.Array.from_buffers(pa.string(), len(texts), [None, pa.py_buffer(offsets.tobytes()),
                                                             pa.py_buffer(b"".join(texts))])  # unchecked UTF-8
    pq.write_table(pa.table({"text": column}), tmp_path / "docs.parquet")
    manifest = prepare(make_config(tmp_path / "docs.parquet", tmp_path / "out"))
    assert manifest["prepare"]["documents"] == 3 and manifest["prepare"]["not_text"]["count"] == 2
    docs = decoded_documents(tmp_path / "out", "train") + decoded_documents(tmp_path / "out", "val")
    assert sorted(docs) == ["a first document", "a second one", "third"]


def test_nothing_but_binary_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(7):
        (corpus / f"blob{i}.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"has no usable text: 7 files or records are not UTF-8 text .*blob0.txt"):
        prepare(make_config(corpus, tmp_path / "out"))
    assert not (tmp_path / "out" / MANIFEST).exists() and not (tmp_path / "out" / ".prepare").exists()


# --------------------------------------------------------------------------- deduplication


@pytest.fixture(scope="module")
def corpus_with_copies(tiny_corpus, tmp_path_factory):
    """The tiny corpus plus later copies of 10 of its documents (one copied twice, one a val document)."""
    corpus = tmp_path_factory.mktemp("copies")
    texts = corpus_texts(tiny_corpus)
    _, val = expected_split(texts)
    copies = texts[:9] + [texts[3], val[0]]
    for i, text in enumerate(texts + copies):
        (corpus / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return corpus


@pytest.mark.parametrize("small", [False, True])
def test_dedup_keeps_the_first_copy(corpus_with_copies, tiny_corpus, tmp_path, monkeypatch, small):
    if small:  # many pieces in 2 processes, and a hash range per ~3 documents
        monkeypatch.setattr(prepare_module, "MIN_PIECE_BYTES", 8192)
        monkeypatch.setattr(dedup_module, "DEDUP_MEMORY_BYTES", 128)
    manifest = prepare(make_config(corpus_with_copies, tmp_path / "out", dedup=True, num_proc=2))
    texts = corpus_texts(tiny_corpus)
    train, val = expected_split(texts)
    assert manifest["prepare"]["duplicates_dropped"] == 11
    assert decoded_documents(tmp_path / "out", "train") == train
    assert decoded_documents(tmp_path / "out", "val") == val


def test_without_dedup_copies_stay_in_their_split(corpus_with_copies, tmp_path):
    manifest = prepare(make_config(corpus_with_copies, tmp_path / "out"))
    texts = corpus_texts(corpus_with_copies)
    train, val = expected_split(texts)
    assert manifest["prepare"]["documents"] == 51 and manifest["prepare"]["duplicates_dropped"] == 0
    assert decoded_documents(tmp_path / "out", "train") == train
    assert decoded_documents(tmp_path / "out", "val") == val and len(val) > len(set(val))  # no val text in train
    assert file_bytes(tmp_path / "out")  # a build, for the eye


# --------------------------------------------------------------------------- durability


def test_shards_and_tokenizer_are_fsynced_before_the_manifest(tiny_corpus, tmp_path, monkeypatch):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the file of a descriptor")
    synced = []
    fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    manifest = prepare(make_config(tiny_corpus, tmp_path / "out", shard_tokens=4000, num_proc=1))
    files = [s["file"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]
    last = synced.index("manifest.json.tmp")
    assert last == max(i for i, name in enumerate(synced) if not name.endswith(("journal.jsonl", "out")))
    for name in files + ["tokenizer.json"]:
        assert f"{name}.tmp" in synced[:last]
    assert synced[last + 1] == "out"  # the directory, after the rename of the manifest


def test_two_builds_never_share_a_work_directory(tiny_corpus, tmp_path):
    from distllm.data.journal import Journal

    running = Journal(tmp_path / "out" / ".prepare", "the key of another build")
    try:
        with pytest.raises(DataError, match=r"another `distllm prepare` is writing .*out/.prepare"):
            prepare(make_config(tiny_corpus, tmp_path / "out"))
        assert (tmp_path / "out" / ".prepare" / "key").read_text() == "the key of another build"
    finally:
        running.close()
    prepare(make_config(tiny_corpus, tmp_path / "out"))  # once it is gone
