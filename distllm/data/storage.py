"""Where a prepared data directory lives: a local path, or any fsspec URL (``s3://``, ``gs://``, ...).

``open_store(data_dir)`` gives one small interface to both::

    store = open_store("s3://bucket/corpus", cache_dir="/scratch/distllm-cache")
    manifest = json.loads(store.read_text("manifest.json"))
    store.prefetch([s["file"] for s in manifest["splits"]["train"]["shards"][1:3]])  # background
    path = store.local_path(shard["file"], size=..., sha256=shard["sha256"])        # ready to np.memmap
    store.close()

A local directory costs nothing: ``local_path`` is ``data_dir / name`` and ``prefetch`` does
nothing. A remote directory is read whole-shard into a per-URL cache directory
(``CACHE_ROOT/<slug>-<hash of the URL>/``): each download goes to a temporary file, is checked
against the size and sha256 given by the caller (the manifest's), and only then renamed into
place, so the cache never holds a partial or wrong file under a shard's name. A cached file is
trusted through its sha256 only, checked once per store (per run); one that fails is downloaded
once more, and a second failure is a ``DataError`` naming the URL. Files asked for without a
sha256 (``manifest.json``, ``tokenizer.json``) are downloaded afresh once per run, so a
re-prepared directory is never read through stale copies. Processes and threads sharing a cache
(the ranks of one node) take a lock per file, so each file is downloaded once.

Connection errors are retried with exponential backoff (``backoff * 2**k`` seconds), then
reported as a ``DataError`` naming the URL and the number of attempts; a missing file or a
refused permission is reported at once. A broken download starts the file over: data is never
partial, wrong, or counted twice. The backend's own retries come on top of these (botocore's
default gives up on a refused connection after about 5 s; ``storage_options={"config_kwargs":
{"retries": {"max_attempts": 1}}}`` leaves retrying to distllm). ``store.stats`` counts
``hits``, ``downloads``, ``retries`` and ``bytes_downloaded``.

Credentials and endpoints come from the usual places of each fsspec backend (for S3 through
s3fs: the ``AWS_*`` environment variables including ``AWS_ENDPOINT_URL``, ``~/.aws``, instance
roles), or from ``storage_options`` passed to the filesystem, e.g.
``{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}`` for an S3-compatible server.

The cache has no size bound: the loader keeps the paths of verified shards for the run, so a
file evicted under it would have to be fetched and verified again; delete ``data.cache_dir`` (or
a URL's sub-directory) to reclaim the space.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
import time
import uuid
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from distllm.errors import DataError

DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 0.5
"""Seconds before the first retry; doubled for each further one (capped at ``MAX_BACKOFF``)."""
MAX_BACKOFF = 30.0
DEFAULT_READ_AHEAD = 2
"""Shards downloaded in the background at most at once."""
CHUNK = 8 << 20  # bytes per read while downloading


def is_url(data_dir: str | os.PathLike) -> bool:
    """True for ``proto://...`` other than ``file://`` (which is a local path)."""
    text = os.fspath(data_dir)
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://", text)
    return bool(match) and match.group(1).lower() not in ("file", "local")


def default_cache_root() -> Path:
    """``$DISTLLM_CACHE_DIR/data``, else ``$XDG_CACHE_HOME/distllm/data``, else ``~/.cache/distllm/data``."""
    if os.environ.get("DISTLLM_CACHE_DIR"):
        return Path(os.environ["DISTLLM_CACHE_DIR"]) / "data"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distllm" / "data"


def open_store(
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    read_ahead: int = DEFAULT_READ_AHEAD,
    storage_options: Optional[dict[str, Any]] = None,
) -> "LocalStore | RemoteStore":
    """A store for ``data_dir``: a local path (or ``file://`` URL) or any fsspec URL.

    ``cache_dir`` (remote only) holds one sub-directory per URL (default: ``default_cache_root()``);
    ``retries`` extra attempts after a connection error, the first after ``backoff`` seconds;
    ``read_ahead`` background downloads at most at once; ``storage_options`` go to the fsspec
    filesystem (credentials, ``client_kwargs={"endpoint_url": ...}``, ...).
    """
    if retries < 0 or backoff < 0 or read_ahead < 0:
        raise ValueError(f"retries, backoff and read_ahead must be >= 0, got {retries}, {backoff}, {read_ahead}")
    if not is_url(data_dir):
        text = os.fspath(data_dir)
        return LocalStore(Path(text[len("file://") :] if text.startswith("file://") else text))
    return RemoteStore(
        os.fspath(data_dir).rstrip("/"),
        cache_dir=Path(cache_dir) if cache_dir is not None else default_cache_root(),
        retries=retries,
        backoff=backoff,
        read_ahead=read_ahead,
        storage_options=storage_options or {},
    )


def storage_kwargs(data) -> dict[str, Any]:
    """The ``open_store`` keyword arguments of a ``DataConfig`` (cache, retries, read-ahead, options)."""
    return {
        "cache_dir": data.cache_dir,
        "retries": data.storage_retries,
        "backoff": data.storage_backoff,
        "read_ahead": data.read_ahead_shards,
        "storage_options": data.storage_options,
    }


def store_from_config(data) -> "LocalStore | RemoteStore":
    """``open_store(data.dir, **storage_kwargs(data))`` for a ``DataConfig``."""
    return open_store(data.dir, **storage_kwargs(data))


def _check_name(name: str) -> str:
    """A file name relative to the data directory (``a.bin`` or ``train/a.bin``), never leaving it."""
    parts = PurePosixPath(name).parts
    if not name or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise DataError(f"bad file name {name!r} in the data directory's manifest; re-run `distllm prepare`")
    return "/".join(parts)


class LocalStore:
    """A data directory on a local (or network-mounted) file system: paths are returned as they are."""

    is_remote = False

    def __init__(self, root: Path):
        self.root = root
        self.stats = {"hits": 0, "downloads": 0, "retries": 0, "bytes_downloaded": 0}

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def url(self, name: str) -> str:
        """How to name ``name`` in messages."""
        return str(self.root / name)

    def exists(self, name: str) -> bool:
        return (self.root / _check_name(name)).is_file()

    def read_text(self, name: str) -> str:
        path = self.root / _check_name(name)
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"{path} not found (data.dir); run `distllm prepare CONFIG` first") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {path}: {e}") from None

    def local_path(self, name: str, size: Optional[int] = None, sha256: Optional[str] = None) -> Path:
        """``root / name``; nothing is read or checked here (the shard readers check headers)."""
        return self.root / _check_name(name)

    def prefetch(self, names: list[str]) -> None:
        """Nothing to do: local files are already here."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "LocalStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteStore:
    """A data directory behind an fsspec URL, read whole-file into a local cache (see the module doc)."""

    is_remote = True

    def __init__(
        self,
        url: str,
        cache_dir: Path,
        retries: int,
        backoff: float,
        read_ahead: int,
        storage_options: dict[str, Any],
    ):
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec comes with datasets
            raise DataError(f"reading {url} needs fsspec: pip install fsspec") from None
        self.url_root = url
        self.retries, self.backoff, self.read_ahead = retries, backoff, read_ahead
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **storage_options)
        except ImportError as e:
            raise DataError(f"data.dir {url}: the fsspec backend is not installed ({e})") from None
        except (TypeError, ValueError) as e:
            raise DataError(f"data.dir {url}: bad storage options ({e}); check data.storage_options") from None
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1])[-60:].strip("_")
        self.cache = cache_dir / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"
        self.stats = {"hits": 0, "downloads": 0, "retries": 0, "bytes_downloaded": 0}
        self._lock = threading.Lock()
        self._inflight: dict[str, Future] = {}  # name -> its running download
        self._known: dict[str, tuple[int, str]] = {}  # cached name -> (size, sha256) checked in this run
        self._fresh: set[str] = set()  # downloaded by read-ahead, not yet asked for
        self._downloaded: set[str] = set()  # downloaded in this run
        self._closed = False
        self._pool = ThreadPoolExecutor(max(read_ahead, 1), thread_name_prefix="distllm-read-ahead")

    def __repr__(self) -> str:
        return f"RemoteStore({self.url_root!r}, cache={str(self.cache)!r})"

    def url(self, name: str) -> str:
        return f"{self.url_root}/{name}"

    def _remote(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{_check_name(name)}"

    # ------------------------------------------------------------------ retries

    def _retrying(self, name: str, what, *args):
        """``what(*args)``, retried with exponential backoff on anything but a missing file."""
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                return what(*args)
            except FileNotFoundError:
                raise DataError(f"{self.url(name)} not found (data.dir); run `distllm prepare CONFIG` first") from None
            except PermissionError as e:
                raise DataError(f"no permission to read {self.url(name)} ({e}); check the credentials") from None
            except (_Corrupt, DataError):
                raise
            except Exception as e:  # connection refused / reset / timeouts, from any backend
                if attempt + 1 == attempts:
                    raise DataError(
                        f"cannot read {self.url(name)} after {attempts} attempts "
                        f"(last error: {type(e).__name__}: {e}); check that the storage is reachable "
                        "(data.dir, data.storage_options, credentials)"
                    ) from None
                with self._lock:
                    self.stats["retries"] += 1
                time.sleep(min(self.backoff * 2**attempt, MAX_BACKOFF))

    # ------------------------------------------------------------------ small files

    def exists(self, name: str) -> bool:
        return bool(self._retrying(name, self.fs.exists, self._remote(name)))

    def read_text(self, name: str) -> str:
        """The current remote content (never cached: manifests may change between runs)."""
        data = self._retrying(name, self.fs.cat_file, self._remote(name))
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{self.url(name)} is not UTF-8 text ({e})") from None

    # ------------------------------------------------------------------ shards

    def local_path(self, name: str, size: Optional[int] = None, sha256: Optional[str] = None) -> Path:
        """The cached copy of ``name``, checked against ``size`` and ``sha256`` when given.

        Waits for a read-ahead already on it; otherwise verifies the cached copy (once per run) or
        downloads it. A copy cached by an earlier run is trusted only through its ``sha256``: without
        one (``manifest.json``, ``tokenizer.json``) the file is downloaded again once per run, so a
        re-prepared directory is never read through stale copies. Raises ``DataError`` naming the URL
        when it cannot get a matching copy.
        """
        name = _check_name(name)
        with self._lock:
            future = self._inflight.get(name)
        if future is not None:
            try:
                future.result()
            except (DataError, CancelledError):
                pass  # the read-ahead failed (or was dropped by close): try here, and report this attempt's error
        with self._lock:
            known = self._known.get(name)
            trusted = known is not None and (sha256 is not None or name in self._downloaded)
            if trusted and _matches(known, size, sha256) is None and (self.cache / name).is_file():
                if name in self._fresh:
                    self._fresh.discard(name)  # downloaded by read-ahead for this request: not a hit
                else:
                    self.stats["hits"] += 1
                return self.cache / name
        return self._fetch(name, size, sha256, for_caller=True)

    def prefetch(self, names: list[str]) -> None:
        """Download ``names`` in the background, in order, keeping at most ``read_ahead`` downloads
        queued or running (names beyond that, or already cached in this run, are skipped: call
        again as reading moves on)."""
        for name in names:
            name = _check_name(name)
            with self._lock:
                if self._closed or len(self._inflight) >= self.read_ahead:
                    return
                if name in self._inflight or name in self._known:
                    continue
                self._inflight[name] = self._pool.submit(self._fetch, name, None, None, False)

    @property
    def pending(self) -> int:
        """Read-ahead downloads queued or running."""
        with self._lock:
            return len(self._inflight)

    def _fetch(self, name: str, size: Optional[int], sha256: Optional[str], for_caller: bool) -> Path:
        """Check the cached copy or download it; one more download if a copy does not match.

        Holds an exclusive lock on ``.NAME.lock`` in the cache meanwhile, so processes (ranks on one
        node) and threads sharing the cache download each file once; the others then find it cached.
        """
        path = self.cache / name
        try:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DataError(
                    f"cannot create the data cache directory {path.parent} ({e}); set data.cache_dir"
                ) from None
            with _locked(path.with_name(f".{path.name}.lock")):
                if path.is_file() and (sha256 is not None or not for_caller):
                    known = _digest(path)
                    if _matches(known, size, sha256) is None:
                        with self._lock:
                            self._known[name] = known
                            if for_caller:
                                self.stats["hits"] += 1
                        return path
                    path.unlink(missing_ok=True)  # a bad cached copy: download it again
                for attempt in range(2):
                    try:
                        known = self._retrying(name, self._download, name, path, size, sha256)
                        break
                    except _Corrupt as e:
                        if attempt == 1:
                            raise DataError(
                                f"{self.url(name)} does not match its manifest entry ({e}) in two downloads; "
                                "the stored file is changed or corrupt: re-run `distllm prepare`"
                            ) from None
            with self._lock:
                self._known[name] = known
                self._downloaded.add(name)
                if not for_caller:
                    self._fresh.add(name)
            return path
        finally:
            if not for_caller:
                with self._lock:
                    self._inflight.pop(name, None)

    def _download(self, name: str, path: Path, size: Optional[int], sha256: Optional[str]) -> tuple[int, str]:
        """One attempt: stream to a temporary file while hashing, check, rename into place."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        digest, n = hashlib.sha256(), 0
        try:
            with self.fs.open(self._remote(name), "rb") as src, _CacheFile(tmp) as dst:
                while chunk := src.read(CHUNK):  # remote errors propagate (and are retried)
                    digest.update(chunk)
                    dst.write(chunk)
                    n += len(chunk)
            known = (n, digest.hexdigest())
            problem = _matches(known, size, sha256)
            if problem is not None:
                raise _Corrupt(problem)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        with self._lock:
            self.stats["downloads"] += 1
            self.stats["bytes_downloaded"] += n
        return known

    def close(self) -> None:
        """Stop read-ahead (running downloads finish; queued ones are dropped). ``local_path`` still works."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._inflight.clear()  # finished or cancelled

    def __enter__(self) -> "RemoteStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _CacheFile:
    """A local file being written; its OS errors (a full disk) become one DataError naming the cache."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.f = open(path, "wb")
        except OSError as e:
            raise self._error(e) from None

    def _error(self, e: OSError) -> DataError:
        return DataError(
            f"cannot write the data cache file {self.path} ({e.strerror or e}); free space or set data.cache_dir"
        )

    def write(self, data: bytes) -> None:
        try:
            self.f.write(data)
        except OSError as e:
            raise self._error(e) from None

    def __enter__(self) -> "_CacheFile":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.f.flush()
                os.fsync(self.f.fileno())
            self.f.close()
        except OSError as e:
            if exc[0] is None:
                raise self._error(e) from None


@contextlib.contextmanager
def _locked(lock_path: Path):
    """An exclusive advisory lock (``flock``) on ``lock_path`` for the ``with`` block."""
    with open(lock_path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Corrupt(Exception):
    """A downloaded file differs from what the manifest says (not retried like a connection error)."""


def _digest(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a local file."""
    digest, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
            n += len(block)
    return n, digest.hexdigest()


def _matches(known: tuple[int, str], size: Optional[int], sha256: Optional[str]) -> Optional[str]:
    """None if ``known`` = (size, sha256) agrees with what is expected (None = anything), else the difference."""
    if size is not None and known[0] != size:
        return f"{known[0]} bytes, expected {size}"
    if sha256 is not None and known[1] != sha256:
        return f"sha256 {known[1][:12]}..., expected {sha256[:12]}..."
    return None
