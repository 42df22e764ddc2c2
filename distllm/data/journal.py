"""The work directory of one ``distllm prepare`` build: what is finished, so a re-run does only the rest.

``WORK/journal.jsonl`` holds one JSON line per finished unit, appended and fsynced after the
unit's files are durable:

* ``{"scan": piece, "docs": ..., ...}``: a piece was scanned (counts, hashes);
* ``{"cut": [piece, limit], "cut_scan": {...}}``: ``data.max_documents`` ends inside ``piece``;
* ``{"dedup": n}``: duplicates found; ``{"tokenizer": fingerprint}``: tokenizer trained;
* ``{"piece": piece, "train": [docs, tokens], "val": [...]}``: a piece was tokenized;
* ``{"shard": entry, "split": s, "index": k}``: a shard was written (or uploaded).

A torn last line (a crash while appending) is ignored. ``WORK/key`` names the settings and
corpus the work belongs to: a different key discards the rest. ``WORK/lock`` (an ``flock``)
keeps two builds out of one directory.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
from pathlib import Path

from distllm.data.shards import SPLITS
from distllm.durable import write_durably
from distllm.errors import DataError

log = logging.getLogger(__name__)

INTERRUPT_ENV = "DISTLLM_PREPARE_INTERRUPT"
"""For tests: ``EVENT:N`` (EVENT = spool, scan, piece or shard) raises KeyboardInterrupt after the N-th
such event of this process (as Ctrl-C would); ``EVENT:N:kill`` kills the process with SIGKILL."""


class Journal:
    """Finished work of one build (see the module docstring); ``add`` records more."""

    def __init__(self, work: Path, key: str):
        self.dir = work
        self.scans: dict[int, dict] = {}
        self.pieces: dict[int, dict] = {}
        self.shards: dict[str, dict[int, dict]] = {s: {} for s in SPLITS}
        self.done: dict = {}
        work.mkdir(parents=True, exist_ok=True)
        self._lock = open(work / "lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DataError(f"another `distllm prepare` is writing {work} (data.dir); wait for it to finish") from None
        key_path = work / "key"
        if not key_path.is_file() or key_path.read_text() != key:
            if key_path.is_file():
                log.info("discarding the unfinished prepare in %s: the settings or the corpus changed", work)
            for entry in work.iterdir():
                if entry.name != "lock":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            write_durably(key_path, key)
        self.path = work / "journal.jsonl"
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    self._apply(json.loads(line))
                except json.JSONDecodeError:
                    break
        self._file = open(self.path, "a")

    def _apply(self, record: dict) -> None:
        if "scan" in record:
            self.scans[record["scan"]] = record
        elif "piece" in record:
            self.pieces[record["piece"]] = record
        elif "shard" in record:
            self.shards[record["split"]][record["index"]] = record["shard"]
        else:
            self.done.update(record)

    def add(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._apply(record)

    def piece_totals(self, split: str, num_pieces: int) -> tuple[int, int]:
        """(documents, tokens) of ``split`` in the first ``num_pieces`` pieces."""
        records = [self.pieces[p][split] for p in range(num_pieces)]
        return sum(r[0] for r in records), sum(r[1] for r in records)

    def close(self) -> None:
        """Stop writing (the work stays for a re-run)."""
        if not self._file.closed:
            self._file.close()
        if not self._lock.closed:
            self._lock.close()  # releases the flock

    def remove(self) -> None:
        """The build is finished (or has nothing worth keeping): delete the work directory."""
        if not self._file.closed:
            self._file.close()
        shutil.rmtree(self.dir, ignore_errors=True)  # the lock file with it; the lock is released on close
        self.close()


class Interrupts:
    """Test hook (``DISTLLM_PREPARE_INTERRUPT``): stop at a chosen point, as Ctrl-C or a kill would."""

    def __init__(self, spec: str = ""):
        parts = spec.split(":") if spec else [None, "0"]
        self.event, self.count, self.kill = parts[0], int(parts[1]), parts[2:] == ["kill"]
        self.seen = 0

    @classmethod
    def from_env(cls) -> "Interrupts":
        return cls(os.environ.get(INTERRUPT_ENV, ""))

    def point(self, event: str) -> None:
        if event != self.event:
            return
        self.seen += 1
        if self.seen == self.count:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise KeyboardInterrupt(f"{INTERRUPT_ENV}={self.event}:{self.count}")
