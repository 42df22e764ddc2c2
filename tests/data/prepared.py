"""Helpers for the prepare tests (imported by tests/data/test_prepare*.py): configs, and reading a
prepared directory back (token streams, decoded documents, file bytes)."""

import numpy as np

from distllm.config import from_dict
from distllm.data.dedup import doc_hash
from distllm.data.shards import open_shard, read_manifest
from distllm.tokenizer import EOT, load_tokenizer


def make_config(source, data_dir, tokenizer=None, run_dir=None, **data):
    """A prepare config: vocab 300 (fast), progress bars off, val_fraction 0.1, ``data`` overrides."""
    raw = {
        "data": {"source": str(source), "dir": str(data_dir), "val_fraction": 0.1, **data},
        "tokenizer": {"vocab_size": 300, **(tokenizer or {})},
        "logging": {"progress": False},
    }
    if run_dir is not None:
        raw["run"] = {"dir": str(run_dir)}
    return from_dict(raw)


def stream(data_dir, split):
    """A split's whole token stream (all shards, in order)."""
    manifest = read_manifest(data_dir)
    shards = [open_shard(data_dir / s["file"]) for s in manifest["splits"][split]["shards"]]
    return np.concatenate(shards) if shards else np.zeros(0, dtype=np.uint16)


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


def expected_split(texts, val_fraction=0.1):
    """(train, val) documents in corpus order by the content-hash rule (when both sides are non-empty)."""
    threshold = int(val_fraction * 2**64)
    val = [t for t in texts if doc_hash(t)[0] < threshold]
    return [t for t in texts if doc_hash(t)[0] >= threshold], val


def file_bytes(data_dir):
    """{name: bytes} of the shards and the tokenizer (what must be identical between two builds)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(data_dir.iterdir())
        if p.is_file() and (p.suffix == ".bin" or p.name == "tokenizer.json")
    }
