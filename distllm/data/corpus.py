"""Corpus sources, read as a stream of documents in a fixed order, cut into independent pieces.

``data.source`` is one of:

* ``python-stdlib``: the ``.py`` files of the running interpreter's standard library (no
  site-packages, no test directories), one document per file, in sorted path order;
* a local file, directory (searched recursively, hidden entries skipped) or glob of ``.txt``
  (one document per file), ``.jsonl``/``.json`` (one document per line or per element of a
  top-level array) or ``.parquet`` files (one document per row), text in ``data.text_field``;
* otherwise a Hugging Face dataset name (``hf:NAME`` or ``NAME``) with ``data.hf_config`` and
  ``data.hf_split``, read with ``datasets``' ``streaming=True`` and spooled to local JSON-lines
  files (``spool_hub``), which are then read like a local corpus.

Files are never loaded as a whole corpus. ``plan_pieces`` cuts the sorted file list into
``Piece``s of about ``piece_bytes`` each (small files grouped, large ``.jsonl`` files cut at
byte offsets, ``.parquet`` files at row groups) and ``read_piece`` streams one piece's documents,
so workers can read pieces independently and the corpus order is (piece, position in piece).
Memory is bounded by a piece's batch of lines or rows, and by the largest single document
(a ``.txt`` file or a ``.json`` array file is read whole).

Input that is not text is reported, never tokenized: ``read_piece`` yields a ``Bad`` record
instead of the text for a file (``.txt``) or record (``.jsonl``/``.json``/``.parquet``) with
NUL bytes or bytes that are not UTF-8. Malformed JSON, a missing ``data.text_field`` or a field
holding something other than text are errors naming the file.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from distllm.config import DataConfig
from distllm.durable import write_durably
from distllm.errors import DataError

STDLIB = "python-stdlib"
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
KINDS = {".txt": "text", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
"""Local file suffix -> how it is read."""
FAMILIES = {"text": "text", "jsonl": "json", "json": "json", "parquet": "parquet"}
"""Kinds that may be mixed in one corpus (``.json`` with ``.jsonl``)."""
PARQUET_BATCH_ROWS = 1024


class FileInfo(NamedTuple):
    path: str
    size: int
    mtime_ns: int


class Span(NamedTuple):
    """Part of one file: bytes ``[start, stop)`` (``text``/``json``: the whole file), or row groups
    ``[start, stop)`` (``parquet``). A ``jsonl`` line belongs to the span holding its first byte."""

    path: str
    kind: str
    start: int
    stop: int


class Piece(NamedTuple):
    """A unit of work: consecutive spans of the corpus, about ``piece_bytes`` of input."""

    index: int
    spans: tuple[Span, ...]
    nbytes: int


class Bad(NamedTuple):
    """A file or record that is not text (yielded instead of its text)."""

    path: str
    reason: str


@dataclass(frozen=True)
class Source:
    """A local corpus: its files (sorted), how to name it in messages, and its text field."""

    origin: str
    files: tuple[FileInfo, ...]
    text_field: str

    def describe(self) -> list:
        """What identifies the corpus content: every file's path, size and modification time."""
        return [list(f) for f in self.files]


# --------------------------------------------------------------------------- sources


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[str]:
    """Sorted ``.py`` files of the standard library, without site-packages and test directories."""
    files = []
    for dirpath, dirnames, filenames in os.walk(stdlib_dir()):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    if not files:
        raise DataError(f"no .py files found in the Python standard library directory {stdlib_dir()}")
    return sorted(files)


def local_files(source: str) -> list[str] | None:
    """The corpus files ``source`` names, or None if it is not a local path (then: a Hub name)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(
            str(f)
            for f in path.rglob("*")
            if f.is_file() and f.suffix in KINDS and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"no {_suffixes()} files in corpus directory {path} (data.source)")
        return files
    if glob.has_magic(source):
        files = sorted(f for f in glob.glob(str(path), recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"no files match the corpus pattern {source} (data.source)")
        return files
    if path.suffix in KINDS or source.startswith(("/", ".", "~")):
        raise DataError(f"corpus not found: {source} (data.source)")
    return None


def is_hub(source: str) -> bool:
    return source != STDLIB and local_files(source) is None


def hub_name(source: str) -> str:
    return source[3:] if source.startswith("hf:") else source


def local_source(cfg: DataConfig) -> Source:
    """The local corpus ``cfg.source`` names (``python-stdlib`` or a path); checked up front:
    suffixes, kinds not mixed, Parquet schemas holding the text field."""
    if cfg.source == STDLIB:
        return Source(f"{STDLIB} ({stdlib_dir()})", tuple(_stat(f) for f in stdlib_files()), "text")
    files = local_files(cfg.source)
    if files is None:
        raise ValueError(f"{cfg.source} is not a local corpus")
    _check_kinds(files, cfg.source)
    for f in files:
        if kind_of(f) == "parquet":
            _check_parquet_field(f, cfg.text_field)
    return Source(cfg.source, tuple(_stat(f) for f in files), cfg.text_field)


def kind_of(path: str) -> str:
    """How a corpus file is read; files of other suffixes named explicitly read as ``text``."""
    return KINDS.get(Path(path).suffix, "text")


def _stat(path: str) -> FileInfo:
    st = os.stat(path)
    return FileInfo(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _suffixes() -> str:
    return ", ".join(KINDS)


def _check_kinds(files: list[str], source: str) -> None:
    suffixes = sorted({Path(f).suffix for f in files})
    if len(files) > 1:  # a single file is read as text whatever its name; several must be known kinds
        unknown = [s for s in suffixes if s not in KINDS]
        if unknown:
            raise DataError(
                f"corpus {source} has unsupported file type {unknown[0] or '(none)'}; use {_suffixes()} (data.source)"
            )
    families = {FAMILIES[kind_of(f)] for f in files}
    if len(families) > 1:
        raise DataError(f"corpus {source} mixes {', '.join(suffixes)} files; point data.source at one kind")


def _check_parquet_field(path: str, field: str) -> None:
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"could not read corpus {path}: {_first_line(e)}") from None
    if field not in schema.names:
        raise _missing_field(field, schema.names, path)
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"field '{field}' in {path} holds {kind}, not text; set data.text_field")


# --------------------------------------------------------------------------- pieces


def plan_pieces(files: tuple[FileInfo, ...] | list[FileInfo], piece_bytes: int) -> list[Piece]:
    """Cut the files, in order, into pieces of about ``piece_bytes`` (a deterministic function of
    the file list and ``piece_bytes``); empty files are left out."""
    pieces: list[Piece] = []
    spans: list[Span] = []
    size = 0
    for f in files:
        for span, nbytes in _units(f, piece_bytes):
            spans.append(span)
            size += nbytes
            if size >= piece_bytes:
                pieces.append(Piece(len(pieces), tuple(spans), size))
                spans, size = [], 0
    if spans:
        pieces.append(Piece(len(pieces), tuple(spans), size))
    return pieces


def _units(f: FileInfo, piece_bytes: int) -> Iterator[tuple[Span, int]]:
    kind = kind_of(f.path)
    if f.size == 0:
        return
    if kind == "jsonl":
        for start in range(0, f.size, piece_bytes):
            stop = min(start + piece_bytes, f.size)
            yield Span(f.path, kind, start, stop), stop - start
    elif kind == "parquet":
        meta = pq.ParquetFile(f.path).metadata
        first, size = 0, 0
        for g in range(meta.num_row_groups):
            size += meta.row_group(g).total_byte_size
            if size >= piece_bytes or g == meta.num_row_groups - 1:
                yield Span(f.path, kind, first, g + 1), size
                first, size = g + 1, 0
    else:
        yield Span(f.path, kind, 0, f.size), f.size


# --------------------------------------------------------------------------- documents


def read_piece(piece: Piece, text_field: str = "text") -> Iterator[str | Bad]:
    """The documents of ``piece`` in order: their text (possibly empty), or ``Bad`` for input that is not text."""
    for span in piece.spans:
        if span.kind == "text":
            yield _read_text_file(span.path)
        elif span.kind == "jsonl":
            yield from _read_jsonl(span, text_field)
        elif span.kind == "json":
            yield from _read_json_file(span.path, text_field)
        else:
            yield from _read_parquet(span, text_field)


def _decode(data: bytes, path: str) -> str | Bad:
    if b"\0" in data:
        return Bad(path, "binary (NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return Bad(path, "not UTF-8")


def _read_text_file(path: str) -> str | Bad:
    with open(path, "rb") as f:
        return _decode(f.read(), path)


def _read_jsonl(span: Span, field: str) -> Iterator[str | Bad]:
    with open(span.path, "rb") as f:
        if span.start > 0:
            f.seek(span.start - 1)
            f.readline()  # the line under way at ``start`` belongs to the previous span
        while f.tell() < span.stop:
            offset = f.tell()
            line = f.readline()
            if not line:
                break
            yield from _json_line(line, span.path, offset, field)


def _json_line(line: bytes, path: str, offset: int, field: str) -> Iterator[str | Bad]:
    if not line.strip():
        return
    row = _parse_json(line, path, offset)
    yield row if isinstance(row, Bad) else _field(row, path, field)


def _read_json_file(path: str, field: str) -> Iterator[str | Bad]:
    """A ``.json`` file holds one top-level array of objects, or JSON lines."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.lstrip().startswith(b"["):
        offset = 0
        for line in data.splitlines(keepends=True):
            yield from _json_line(line, path, offset, field)
            offset += len(line)
        return
    rows = _parse_json(data, path, 0)
    if isinstance(rows, Bad):
        yield rows
        return
    for row in rows:
        yield _field(row, path, field)


def _parse_json(data: bytes, path: str, offset: int) -> object:
    """The JSON value in ``data`` (found at byte ``offset`` of ``path``), or Bad if it is not UTF-8."""
    text = _decode(data, path)
    if isinstance(text, Bad):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"could not read corpus {path}: JSON parse error at byte {offset + e.pos}: {e.msg}") from None


def _field(row: object, path: str, field: str) -> str | Bad:
    if not isinstance(row, dict):
        raise DataError(f"could not read corpus {path}: expected JSON objects with a '{field}' field, got {row!r:.40}")
    if field not in row:
        raise _missing_field(field, list(row), path)
    value = row[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"field '{field}' in {path} holds {type(value).__name__}, not text; set data.text_field")
    return _checked_str(value, path)


def _checked_str(value: str, path: str) -> str | Bad:
    if "\0" in value:
        return Bad(path, "binary (NUL characters)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return Bad(path, "not UTF-8 (lone surrogates)")
    return value


def _read_parquet(span: Span, field: str) -> Iterator[str | Bad]:
    pf = pq.ParquetFile(span.path)
    groups = range(span.start, span.stop)
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=[field]):
        column = batch.column(0)
        try:
            values = column.to_pylist()
        except UnicodeDecodeError:  # Arrow strings that are not UTF-8: check row by row
            values = [_arrow_value(column, i, span.path) for i in range(len(column))]
        for value in values:
            yield "" if value is None else value if isinstance(value, Bad) else _checked_str(value, span.path)


def _arrow_value(column: pa.Array, i: int, path: str) -> str | Bad | None:
    try:
        return column[i].as_py()
    except UnicodeDecodeError:
        return Bad(path, "not UTF-8")


# --------------------------------------------------------------------------- Hugging Face datasets


def spool_hub(
    cfg: DataConfig, spool_dir: Path, file_bytes: int, on_file: Callable[[], None] = lambda: None
) -> list[FileInfo]:
    """Stream ``cfg.source`` from the Hub (``streaming=True``) into JSON-lines files of about
    ``file_bytes`` in ``spool_dir`` (field ``text``); resumable: complete files are kept and the
    stream skips the rows they hold. With ``cfg.max_documents``, stop after that many non-empty
    texts. ``on_file()`` is called after each file is complete."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    progress_path = spool_dir / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {"files": 0, "rows": 0, "docs": 0}
    for tmp in spool_dir.glob("*.tmp"):
        tmp.unlink()
    if not progress.get("done"):
        _spool(cfg, spool_dir, file_bytes, progress, progress_path, on_file)
    return [_stat(str(spool_dir / f"{i:06d}.jsonl")) for i in range(progress["files"])]


def _spool(cfg: DataConfig, spool_dir: Path, file_bytes: int, progress: dict, progress_path: Path,
           on_file: Callable[[], None]) -> None:  # fmt: skip
    name = hub_name(cfg.source)
    origin = f"Hugging Face dataset '{name}'"
    out, size, rows, docs = None, 0, progress["rows"], progress["docs"]

    def commit(done: bool) -> None:
        nonlocal out, size
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            os.replace(spool_dir / f"{progress['files']:06d}.tmp", spool_dir / f"{progress['files']:06d}.jsonl")
            progress["files"] += 1
            out, size = None, 0
        progress.update(rows=rows, docs=docs, done=done)
        write_durably(progress_path, json.dumps(progress))

    try:
        import datasets

        stream = datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split, streaming=True)
        if rows:
            stream = stream.skip(rows)
        for row in stream:
            if cfg.text_field not in row:
                raise _missing_field(cfg.text_field, list(row), origin)
            text = row[cfg.text_field]
            if out is None:
                out = open(spool_dir / f"{progress['files']:06d}.tmp", "w", encoding="utf-8")
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            out.write(line)
            size += len(line)
            rows += 1
            docs += isinstance(text, str) and not text.isspace() and text != ""
            if cfg.max_documents is not None and docs >= cfg.max_documents:
                break
            if size >= file_bytes:
                commit(done=False)
                on_file()
    except DataError:
        raise
    except Exception as e:  # ConnectionError, DatasetNotFoundError, bad config/split names, HTTP errors ...
        where = f"config {cfg.hf_config!r}, split {cfg.hf_split!r}"
        raise DataError(
            f"could not load Hugging Face dataset '{name}' ({where}) and data.source is not a local path: "
            f"{type(e).__name__}: {_first_line(e)} (offline? use a local path)"
        ) from None
    commit(done=True)


# --------------------------------------------------------------------------- convenience


def load_corpus(cfg: DataConfig) -> Iterator[str]:
    """The non-empty text documents of a local ``cfg.source`` in corpus order (at most
    ``cfg.max_documents``), streamed; input that is not text is left out."""
    source = local_source(cfg)
    count = 0
    for piece in plan_pieces(source.files, 1 << 26):
        for doc in read_piece(piece, source.text_field):
            if isinstance(doc, Bad) or not doc or doc.isspace():
                continue
            if cfg.max_documents is not None and count >= cfg.max_documents:
                return
            count += 1
            yield doc


def _missing_field(field: str, names: list, origin: str) -> DataError:
    return DataError(
        f"field '{field}' not found in {origin} (it has: {', '.join(map(str, names)) or 'no fields'}); "
        "set data.text_field"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
