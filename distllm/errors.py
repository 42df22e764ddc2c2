"""Errors a user can cause and fix.

Anything raised as a ``UserError`` (or a subclass) is reported by the CLI as one clear
line and a non-zero exit code, without a traceback. Everything else is a bug in distllm
and keeps its traceback.
"""


class UserError(Exception):
    """Something the user can fix: a bad config value, a missing or corrupt file, ..."""


class ConfigError(UserError):
    """An invalid configuration (unknown key, wrong type, inconsistent values)."""


class DataError(UserError):
    """Missing, empty or corrupt data (corpus, shards, manifest, tokenizer)."""


class CheckpointError(UserError):
    """A missing, incomplete or incompatible checkpoint."""


class RunDirLocked(UserError):
    """Another live run holds the run directory (distllm/run_lock.py)."""
