"""``checkpoint.upload_to``: a copy of each committed checkpoint in object storage (``s3://bucket/prefix``,
or any fsspec URL), made in the background; and ``checkpoint.resume_from: URL`` to start from it.

Layout: ``URL/step_000300/<the checkpoint's files>``, its ``COMPLETE`` marker uploaded last, so a copy
without a marker (an upload cut short) is never picked, exactly as on disk. Uploads run one at a time
in one thread of rank 0, after the local commit; training goes on meanwhile. A failed upload is logged
(one line) and training goes on: the local checkpoint is the one the run relies on. The end of a run
waits for the pending uploads. The local ``checkpoint.keep_last`` does not delete remote copies.

Resume: ``checkpoint.resume_from: URL`` (a prefix: its newest copy with a marker; or ``URL/step_N``)
downloads the checkpoint into ``run.dir/checkpoints/step_N`` (each file checked against the manifest's
size and sha256 as it arrives, fetched again if it does not match; the marker last) and resumes from it
as from any local checkpoint -- unless run.dir already has checkpoints that verify:
then the run continues from its own newest, so that re-running the same command after a preemption
continues where it stopped. Credentials come from ``checkpoint.storage_options`` (redacted wherever the
config is written) or the environment.
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import threading
from pathlib import Path

from distllm import checkpoint
from distllm.durable import fsync_path, sha256_file, write_durably
from distllm.errors import CheckpointError
from distllm.redact import redact_text

logger = logging.getLogger(__name__)
_STEP = re.compile(r"^step_(\d+)$")


def is_url(spec: str | None) -> bool:
    return bool(spec) and "://" in spec and not spec.startswith("file://")


def _fs(url: str, storage_options: dict | None):
    from fsspec.core import url_to_fs

    return url_to_fs(url, **(storage_options or {}))


class Uploader:
    """Copies committed checkpoints to ``url`` in one background thread (rank 0)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url, self.storage_options = url.rstrip("/"), storage_options
        self.uploaded: list[str] = []
        self.failed: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="distllm-upload", daemon=True)
        self._thread.start()

    def submit(self, path: Path) -> None:
        self._queue.put(Path(path))

    def close(self) -> None:
        """Wait for every submitted upload."""
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        while (path := self._queue.get()) is not None:
            target = f"{self.url}/{path.name}"
            try:
                upload(path, target, self.storage_options)
                self.uploaded.append(target)
                logger.info(f"uploaded checkpoint {path.name} to {target}")
            except Exception as e:  # the local checkpoint stands; the run goes on
                self.failed.append(target)
                logger.warning(redact_text(f"could not upload checkpoint {path} to {target}: "
                                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))


def upload(path: Path, target: str, storage_options: dict | None = None) -> None:
    """Copy a committed checkpoint directory to ``target``, its marker last."""
    manifest = checkpoint.read_marker(path)
    fs, root = _fs(target, storage_options)
    for name in sorted(manifest["files"]):
        fs.put_file(str(path / name), f"{root}/{name}")
    fs.put_file(str(path / checkpoint.MARKER), f"{root}/{checkpoint.MARKER}")


def remote_checkpoint(url: str, storage_options: dict | None = None) -> str:
    """``URL/step_N`` -> itself (it must have a marker); a prefix -> its newest ``step_N`` with a marker."""
    fs, root = _fs(url.rstrip("/"), storage_options)
    fs.invalidate_cache()  # another process may have uploaded since this filesystem object listed it
    if _STEP.match(root.rsplit("/", 1)[-1]):
        if not fs.exists(f"{root}/{checkpoint.MARKER}"):
            raise CheckpointError(f"checkpoint {url} is not committed (no {checkpoint.MARKER} marker)")
        return url.rstrip("/")
    steps = []
    for entry in fs.ls(root, detail=False) if fs.exists(root) else []:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if _STEP.match(name) and fs.exists(f"{entry.rstrip('/')}/{checkpoint.MARKER}"):
            steps.append((int(_STEP.match(name).group(1)), name))
    if not steps:
        raise CheckpointError(f"no committed checkpoint under {url}")
    return f"{url.rstrip('/')}/{max(steps)[1]}"


def download(url: str, run_dir: Path, storage_options: dict | None = None, attempts: int = 3) -> Path:
    """Copy the remote checkpoint ``url`` (``.../step_N``) into ``run_dir/checkpoints/step_N``, marker last.

    Each file is checked against the manifest (size and sha256) as it arrives and fetched again, up to
    ``attempts`` times, if it does not match: a copy that does not match is never committed locally (it would
    be refused at load, run after run)."""
    fs, root = _fs(url, storage_options)
    name = root.rsplit("/", 1)[-1]
    final = checkpoint.checkpoint_dir(run_dir) / name
    tmp = final.with_name(f".tmp-{name}")
    if (final / checkpoint.MARKER).exists():  # a local checkpoint of that step: never overwritten
        raise CheckpointError(f"{final} already exists; it is not replaced by the download of {url}")
    for leftover in (final, tmp):  # of a download cut short (before or after its rename): never resumed from
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        marker_text = fs.cat_file(f"{root}/{checkpoint.MARKER}")
        (tmp / checkpoint.MARKER).write_bytes(marker_text)
        manifest = checkpoint.read_marker(tmp)
        (tmp / checkpoint.MARKER).unlink()
        for file, expected in manifest["files"].items():
            _fetch(fs, f"{root}/{file}", tmp / file, expected, attempts, url)
        fsync_path(tmp)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_durably(final / checkpoint.MARKER, marker_text)  # last, as a local save commits: only a whole copy counts
    fsync_path(final.parent)
    return final


def _fetch(fs, remote: str, local: Path, expected: dict, attempts: int, url: str) -> None:
    """Fetch one file and check it against its manifest entry (size, sha256), fsynced; retried on a mismatch or
    a storage error."""
    attempts = max(1, attempts)
    for attempt in range(1, attempts + 1):
        try:
            fs.get_file(remote, str(local))
        except Exception:
            if attempt == attempts:
                raise
            continue
        size = local.stat().st_size
        if size != expected["size"]:  # no need to hash it
            got = f"{size} bytes, its manifest says {expected['size']}"
            continue
        sha = sha256_file(local)
        if sha == expected["sha256"]:
            fsync_path(local)
            return
        got = f"sha256 {sha[:12]}..., its manifest says {expected['sha256'][:12]}..."
    raise CheckpointError(f"checkpoint {url}: {local.name} arrived {attempts} times with {got}: the remote copy "
                          "is corrupt; resume from another step (checkpoint.resume_from: URL/step_N)")


def resume_source(spec: str, run_dir: Path, storage_options: dict | None) -> Path | None:
    """Rank 0: the local checkpoint to resume from for ``checkpoint.resume_from: URL`` (see the module doc)."""
    own = checkpoint.latest(run_dir)
    if own is not None:
        logger.warning(f"run directory {run_dir} has its own checkpoints: continuing from {own.name}, not from {spec}")
        return own
    try:
        source = remote_checkpoint(spec, storage_options)
        logger.warning(f"downloading checkpoint {source} into {checkpoint.checkpoint_dir(run_dir)}")
        return download(source, run_dir, storage_options)
    except CheckpointError:
        raise
    except Exception as e:  # every rank waits for this answer: a storage error becomes one clear line
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(redact_text(f"could not fetch checkpoint.resume_from {spec}: {type(e).__name__}: "
                                          f"{first}; check the URL and checkpoint.storage_options")) from None
