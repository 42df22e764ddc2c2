"""Durable files: the one place that hashes files, fsyncs them and replaces them atomically.

Data preparation (shards, manifests, the tokenizer, journals) and checkpoints (tensors, the commit
marker) make the same promise -- a file is either absent or complete and on disk -- with the same
three steps, done here:

1. write into a temporary file beside the target and ``fsync`` it (the bytes are on disk);
2. ``os.replace`` it onto the target (atomic on POSIX: readers see the old file or the new one);
3. ``fsync`` the directory (the rename itself survives a power loss).

A failed fsync is an error, never swallowed: a write that may not be durable must not be reported as
done. The one exception is a filesystem that cannot fsync a directory at all (EINVAL / ENOTSUP, some
network and FUSE filesystems), where the rename is as durable as that filesystem can make it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path
from typing import IO, Iterator

_NO_DIR_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR}


def sha256_file(path: str | os.PathLike, block_size: int = 1 << 22) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data (written by anyone, e.g. a library's writer) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory ``path`` (a rename, a new or deleted file) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if e.errno in _NO_DIR_FSYNC or e.errno == errno.EACCES and os.name == "nt":
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


def fsync_path(path: str | os.PathLike) -> None:
    """``fsync_dir`` for a directory, else ``fsync_file``."""
    (fsync_dir if os.path.isdir(path) else fsync_file)(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open ``path``'s temporary twin for writing; on a clean exit it is fsynced and renamed onto
    ``path`` and the directory fsynced. On an exception the temporary file is removed and ``path``
    is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_durably(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically and durably (see the module docstring)."""
    if isinstance(data, str):
        with atomic_file(path, "w", encoding="utf-8") as f:
            f.write(data)
    else:
        with atomic_file(path, "wb") as f:
            f.write(data)
