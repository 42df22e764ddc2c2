"""Synthetic prepared data directories for loader tests (imported by tests/data/test_*.py).

Token ids equal their position in the stream (plus an offset per directory), so a window's
first token tells which sample it is.
"""

import shutil

import numpy as np

from distllm.data.shards import write_manifest, write_shard
from distllm.tokenizer import fingerprint, load_tokenizer


def make_data_dir(path, tokenizer_dir, splits, vocab_size=65536):
    """A data dir whose shards hold the given token arrays (lists of shards per split)."""
    path.mkdir()
    shutil.copy(tokenizer_dir / "tokenizer.json", path / "tokenizer.json")
    fp = fingerprint(load_tokenizer(path / "tokenizer.json"))
    manifest = {
        "format_version": 1,
        "source": "synthetic",
        "created": "now",
        "tokenizer": {"file": "tokenizer.json", "fingerprint": fp, "vocab_size": vocab_size, "eot_id": 0},
        "dtype": "uint16",
        "splits": {},
    }
    for split, shards in splits.items():
        entries = [write_shard(path / f"{split}_{i:06d}.bin", s.astype(np.uint16), fp) for i, s in enumerate(shards)]
        total = sum(e["num_tokens"] for e in entries)
        manifest["splits"][split] = {"num_tokens": total, "num_documents": 1, "shards": entries}
    write_manifest(path, manifest)
    return path


def stream_dir(path, tokenizer_dir, num_tokens, shard_tokens, offset=0):
    """Train stream offset, offset + 1, ... in shards of ``shard_tokens``; a small val split."""
    tokens = np.arange(num_tokens) + offset
    shards = [tokens[i : i + shard_tokens] for i in range(0, num_tokens, shard_tokens)]
    return make_data_dir(path, tokenizer_dir, {"train": shards, "val": [np.arange(50)]})
