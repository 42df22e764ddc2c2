"""The tiny data's settings, importable by tests (``from tiny_data import ...``): a module of its own because
``conftest`` is a different module in each test folder, so ``from conftest import`` depends on collection order."""

from distllm.config import Config, from_dict

TINY_VOCAB = 512


def tiny_data_config(source, data_dir) -> Config:
    """Config used to prepare the tiny data (also handy for tests that prepare variants)."""
    return from_dict(
        {
            "data": {"source": str(source), "dir": str(data_dir), "val_fraction": 0.1},
            "tokenizer": {"vocab_size": TINY_VOCAB},
            "logging": {"progress": False},
        }
    )
