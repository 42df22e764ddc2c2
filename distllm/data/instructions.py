"""Instruction data: conversations read from JSON lines, JSON or Parquet files, or the built-in set.

A source (``sft.data``) is ``python-stdlib-docstrings`` (``distllm.data.docstrings``), a file, or
a directory of ``.jsonl`` / ``.json`` / ``.parquet`` files (read in sorted path order, hidden
entries skipped). Each record is either

* chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``
  (multi-turn; a system message only first; at least one assistant turn), or
* Alpaca: ``{"instruction": "...", "input": "..." (optional), "output": "..."}``, which becomes a
  user turn (the instruction, then ``"\\n\\n### Input:\\n"`` and the input when there is one) and an
  assistant turn (the output): with the default template, exactly the Alpaca prompt format.

A ``.json`` file holds a top-level array of records or JSON lines. Anything malformed (bad JSON,
neither format, an unknown role, an empty assistant turn, text that is not a string) is one
DataError naming the file and the line (``.jsonl``), element (``.json`` array) or row (Parquet).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distllm.chat import check_messages
from distllm.data.docstrings import DOCSTRINGS, docstring_pairs
from distllm.errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet")
INPUT_HEADER = "\n\n### Input:\n"


@dataclass(frozen=True)
class Example:
    """One conversation (validated ``{"role", "content"}`` messages) and where it came from."""

    messages: list[dict]
    where: str


def read_examples(source: str, max_examples: int | None = None) -> Iterator[Example]:
    """The examples of ``source`` in order (at most ``max_examples``)."""
    return itertools.islice(_examples(source), max_examples)


def _examples(source: str) -> Iterator[Example]:
    if source == DOCSTRINGS:
        for i, (instruction, response) in enumerate(docstring_pairs()):
            yield Example(alpaca_messages(instruction, "", response), f"{DOCSTRINGS}[{i}]")
        return
    for path in source_files(source):
        if path.suffix == ".parquet":
            yield from _read_parquet(path)
        else:
            yield from _read_json(path)


def source_files(source: str) -> list[Path]:
    """The files of a local source (a file, or a directory searched recursively); DataError if none."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            f for f in path.rglob("*")
            if f.is_file() and f.suffix in SUFFIXES and not any(p.startswith(".") for p in f.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"no {', '.join(SUFFIXES)} files in instruction data directory {path} (sft.data)")
        return files
    raise DataError(f"instruction data not found: {source} (sft.data: a file, a directory or {DOCSTRINGS})")


def alpaca_messages(instruction: str, input: str, output: str) -> list[dict]:
    """An Alpaca record as a user turn and an assistant turn."""
    user = instruction + (INPUT_HEADER + input if input else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def to_messages(record: object, where: str) -> list[dict]:
    """The validated messages of one record (chat or Alpaca); DataError naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {record!r:.60}")
    if "messages" in record:
        return check_messages(record["messages"], where)
    if "instruction" in record and "output" in record:
        fields = {k: record.get(k) for k in ("instruction", "input", "output")}
        for key, value in fields.items():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: '{key}' holds {type(value).__name__}, not text")
        if not (fields["instruction"] or "").strip():
            raise DataError(f"{where}: 'instruction' is empty")
        if not (fields["output"] or "").strip():
            raise DataError(f"{where}: 'output' is empty (an empty assistant turn: nothing to learn)")
        return check_messages(alpaca_messages(fields["instruction"], fields["input"] or "", fields["output"]), where)
    raise DataError(f"{where}: expected 'messages' (chat) or 'instruction' and 'output' (Alpaca); "
                    f"the record has {', '.join(map(str, record)) or 'no fields'}")


def _read_json(path: Path) -> Iterator[Example]:
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        for i, record in enumerate(records):
            where = f"{path}[{i}]"
            yield Example(to_messages(record, where), where)
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        yield Example(to_messages(record, where), where)


def _read_parquet(path: Path) -> Iterator[Example]:
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read Parquet ({e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            where = f"{path} row {row}"
            yield Example(to_messages(record, where), where)
            row += 1
