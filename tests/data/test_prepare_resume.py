"""An interrupted ``distllm prepare`` finished by a re-run gives the same shards as an uninterrupted one.

Interruptions are injected with ``DISTLLM_PREPARE_INTERRUPT=EVENT:N[:kill]``: KeyboardInterrupt
(Ctrl-C) in this process, or SIGKILL of a ``distllm prepare`` subprocess (no cleanup at all).
"""

import os
import subprocess
import sys

import pytest
import yaml
from prepared import corpus_texts, file_bytes, make_config

import distllm.data.prepare as prepare_module
from distllm.data.prepare import INTERRUPT_ENV, prepare
from distllm.data.shards import MANIFEST, verify

SETTINGS = {"shard_tokens": 3000, "val_fraction": 0.2}
SMALL_PIECES = 8192  # the tiny corpus (about 60 KB) in 8 pieces


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    """An uninterrupted build with the settings of these tests."""
    out = tmp_path_factory.mktemp("reference") / "data"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare_module, "MIN_PIECE_BYTES", SMALL_PIECES)
        manifest = prepare(make_config(tiny_corpus, out, num_proc=1, **SETTINGS))
    assert len(manifest["splits"]["train"]["shards"]) >= 4
    return out


@pytest.mark.parametrize("point, num_proc", [("scan:3", 2), ("piece:3", 1), ("piece:2", 2), ("shard:2", 1)])
def test_interrupted_prepare_finishes_with_identical_shards(point, num_proc, reference, tiny_corpus, tmp_path,
                                                            monkeypatch):  # fmt: skip
    monkeypatch.setattr(prepare_module, "MIN_PIECE_BYTES", SMALL_PIECES)
    out = tmp_path / "data"
    cfg = make_config(tiny_corpus, out, num_proc=num_proc, **SETTINGS)
    monkeypatch.setenv(INTERRUPT_ENV, point)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert not (out / MANIFEST).exists()  # never looks complete
    assert (out / ".prepare" / "journal.jsonl").is_file()

    monkeypatch.delenv(INTERRUPT_ENV)
    prepare(cfg)
    verify(out, check_hashes=True)
    assert file_bytes(out) == file_bytes(reference)
    assert not (out / ".prepare").exists()


def test_rerun_does_only_what_is_missing(reference, tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "MIN_PIECE_BYTES", SMALL_PIECES)
    cfg = make_config(tiny_corpus, tmp_path / "data", num_proc=1, **SETTINGS)
    scanned, tokenized, trained = [], [], []
    scan, tokenize, train = prepare_module.scan_piece, prepare_module.tokenize_piece, prepare_module.train_tokenizer
    monkeypatch.setattr(prepare_module, "scan_piece", lambda task: scanned.append(task[0].index) or scan(task))
    monkeypatch.setattr(prepare_module, "tokenize_piece", lambda t: tokenized.append(t[0].index) or tokenize(t))
    monkeypatch.setattr(prepare_module, "train_tokenizer", lambda *a, **k: trained.append(1) or train(*a, **k))

    monkeypatch.setenv(INTERRUPT_ENV, "piece:5")
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    pieces = len(scanned)
    assert pieces >= 7 and tokenized == list(range(5)) and trained == [1]

    monkeypatch.delenv(INTERRUPT_ENV)
    scanned.clear(), tokenized.clear(), trained.clear()
    prepare(cfg)
    assert scanned == [] and trained == []  # the scan and the tokenizer are not redone
    assert tokenized == list(range(5, pieces))  # nor are the pieces tokenized before the interruption
    assert file_bytes(tmp_path / "data") == file_bytes(reference)


def test_changed_settings_discard_the_unfinished_work(reference, tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "MIN_PIECE_BYTES", SMALL_PIECES)
    out = tmp_path / "data"
    monkeypatch.setenv(INTERRUPT_ENV, "shard:1")
    with pytest.raises(KeyboardInterrupt):
        prepare(make_config(tiny_corpus, out, num_proc=1, **{**SETTINGS, "shard_tokens": 1000}))
    monkeypatch.delenv(INTERRUPT_ENV)
    prepare(make_config(tiny_corpus, out, num_proc=1, **SETTINGS))
    assert file_bytes(out) == file_bytes(reference)  # no 1000-token shard left over


def test_killed_prepare_subprocess_finishes_on_rerun(tiny_corpus, tmp_path):
    """SIGKILL right after the second shard (nothing cleaned up, a piece half consumed), then the same command."""
    def run(out, env_extra):
        config = tmp_path / "prepare.yaml"
        config.write_text(yaml.safe_dump({
            "data": {"source": str(tiny_corpus), "dir": str(out), "shard_tokens": 2000, "val_fraction": 0.2},
            "tokenizer": {"vocab_size": 300}, "logging": {"progress": False},
        }))  # fmt: skip
        env = {**os.environ, **env_extra}
        return subprocess.run([sys.executable, "-m", "distllm", "prepare", str(config)], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    assert run(tmp_path / "reference", {}).returncode == 0
    out = tmp_path / "data"
    killed = run(out, {INTERRUPT_ENV: "shard:2:kill"})
    assert killed.returncode == -9, killed.stderr
    assert not (out / MANIFEST).exists() and (out / "train_000001.bin").exists()
    finished = run(out, {})
    assert finished.returncode == 0, finished.stderr
    assert file_bytes(out) == file_bytes(tmp_path / "reference")


class FakeStream:
    """A ``datasets`` streaming dataset: iterable rows, ``skip(n)``; records the skips."""

    def __init__(self, rows, skips, start=0):
        self.rows, self.skips, self.start = rows, skips, start

    def __iter__(self):
        return iter(self.rows[self.start :])

    def skip(self, n):
        self.skips.append(n)
        return FakeStream(self.rows, self.skips, self.start + n)


def test_interrupted_hub_stream_resumes_where_it_stopped(tiny_corpus, tmp_path, monkeypatch):
    import datasets

    rows = [{"text": t} for t in corpus_texts(tiny_corpus)]
    skips = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: FakeStream(rows, skips))
    monkeypatch.setattr(prepare_module, "SPOOL_FILE_BYTES", 10_000)  # 6 spool files
    prepare(make_config("hf:someone/corpus", tmp_path / "reference", **SETTINGS))
    assert skips == []

    cfg = make_config("hf:someone/corpus", tmp_path / "data", **SETTINGS)
    monkeypatch.setenv(INTERRUPT_ENV, "spool:3")
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    monkeypatch.delenv(INTERRUPT_ENV)
    prepare(cfg)
    assert len(skips) == 1 and 0 < skips[0] < len(rows)  # the rows of the 3 finished files are not read again
    assert file_bytes(tmp_path / "data") == file_bytes(tmp_path / "reference")
