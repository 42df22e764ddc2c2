"""Where ``distllm prepare`` writes: a local directory, or any fsspec URL (``s3://bucket/prefix``, ...).

Both targets have the same small interface. Shards are always written to a local file first
(``write_shard``: temp file, fsync, rename): a local target writes them in place; a remote
target writes them to a local staging directory, uploads each finished shard (an object store
makes an object visible only when its upload completes), checks the uploaded size, and deletes
the staged copy, so local disk holds at most one shard per split. ``put_text`` (tokenizer,
manifest) is atomic on both. The caller uploads the manifest last.

Remote credentials and endpoints come from the fsspec backend's usual places or
``data.storage_options`` (e.g. ``{client_kwargs: {endpoint_url: ...}}`` for s3fs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from distllm.data.shards import write_shard
from distllm.durable import write_durably
from distllm.data.storage import is_url
from distllm.errors import DataError


class LocalOutput:
    """A local data directory."""

    def __init__(self, root: Path):
        self.root = root

    def __str__(self) -> str:
        return str(self.root)

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def read_bytes(self, name: str) -> Optional[bytes]:
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def size(self, name: str) -> Optional[int]:
        path = self.root / name
        return path.stat().st_size if path.is_file() else None

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file()) if self.root.is_dir() else []

    def write_shard(self, name: str, tokens: np.ndarray, fingerprint: str) -> dict:
        return write_shard(self.root / name, tokens, fingerprint)

    def put_text(self, name: str, text: str) -> None:
        write_durably(self.root / name, text)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


class RemoteOutput:
    """A directory at an fsspec URL; shards are staged in ``staging`` and uploaded one at a time."""

    def __init__(self, url: str, staging: Path, storage_options: dict[str, Any]):
        import fsspec

        self.url = url.rstrip("/")
        self.staging = staging
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        except (ImportError, ValueError, TypeError) as e:
            raise DataError(f"data.dir {url}: {e} (check data.storage_options; s3:// needs s3fs)") from None

    def __str__(self) -> str:
        return self.url

    def _call(self, what: str, name: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except Exception as e:  # botocore / aiohttp / OS errors: one line naming the object
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(
                f"could not {what} {self.url}/{name}: {type(e).__name__}: {detail} "
                "(data.dir, data.storage_options, credentials); re-run `distllm prepare` to continue"
            ) from None

    def prepare(self) -> None:
        self.staging.mkdir(parents=True, exist_ok=True)
        self._call("create", "", self.fs.makedirs, self.root, True)

    def read_bytes(self, name: str) -> Optional[bytes]:
        try:
            return self._call("read", name, self.fs.cat_file, f"{self.root}/{name}")
        except FileNotFoundError:
            return None

    def size(self, name: str) -> Optional[int]:
        try:
            self.fs.invalidate_cache(f"{self.root}/{name}")
            return int(self._call("stat", name, self.fs.info, f"{self.root}/{name}")["size"])
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        try:
            self.fs.invalidate_cache(self.root)
            listing = self._call("list", "", self.fs.ls, self.root, False)
        except FileNotFoundError:
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listing)

    def write_shard(self, name: str, tokens: np.ndarray, fingerprint: str) -> dict:
        local = self.staging / name
        entry = write_shard(local, tokens, fingerprint)
        self._call("upload", name, self.fs.put_file, str(local), f"{self.root}/{name}")
        size, expected = self.size(name), local.stat().st_size
        if size != expected:
            raise DataError(f"upload of {self.url}/{name} is incomplete ({size} of {expected} bytes); re-run prepare")
        local.unlink()
        return entry

    def put_text(self, name: str, text: str) -> None:
        self._call("write", name, self.fs.pipe_file, f"{self.root}/{name}", text.encode("utf-8"))

    def delete(self, name: str) -> None:
        try:
            self._call("delete", name, self.fs.rm_file, f"{self.root}/{name}")
        except FileNotFoundError:
            pass


Output = LocalOutput | RemoteOutput


def open_output(data_dir: str, staging: Path, storage_options: Optional[dict] = None) -> Output:
    """The target of ``data.dir``: a local path (``file://`` allowed) or an fsspec URL."""
    if is_url(data_dir):
        return RemoteOutput(data_dir, staging, storage_options or {})
    text = str(data_dir)
    return LocalOutput(Path(text[len("file://"):] if text.startswith("file://") else text).expanduser())
