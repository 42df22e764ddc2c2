"""Data pipeline: corpus -> tokenizer + token shards -> batches.

``distllm.data.prepare.prepare(cfg)`` builds a data directory (not re-exported here: the name
would shadow the ``prepare`` module), ``build_train_loader`` (training) and ``TokenShards`` +
``SampleIndex`` (any split) read it.
"""

from distllm.data.corpus import load_corpus
from distllm.data.loader import SampleIndex, TokenShards, TrainLoader, build_train_loader
from distllm.data.shards import (
    ShardHeader,
    open_shard,
    read_header,
    read_manifest,
    verify,
    write_manifest,
    write_shard,
)
from distllm.durable import sha256_file

__all__ = [
    "SampleIndex",
    "ShardHeader",
    "TokenShards",
    "TrainLoader",
    "build_train_loader",
    "load_corpus",
    "open_shard",
    "read_header",
    "read_manifest",
    "sha256_file",
    "verify",
    "write_manifest",
    "write_shard",
]
