"""Read a corpus into a ``datasets.Dataset`` of documents (one column, ``text``).

``data.source`` is one of:

* ``python-stdlib``: the ``.py`` files of the running interpreter's standard library (no
  site-packages, no test directories), one document per file, in sorted path order;
* a local file, directory (searched recursively, hidden entries skipped) or glob of ``.txt``
  (one document per file), ``.jsonl``/``.json`` or ``.parquet`` files (one document per row,
  text in ``data.text_field``);
* otherwise a Hugging Face dataset name (``hf:NAME`` or ``NAME``) with ``data.hf_config`` and
  ``data.hf_split``. With ``data.max_documents`` set, only that many documents are streamed
  instead of downloading the whole dataset.

The result is memory-mapped Arrow (``datasets`` converts local files once and caches them under
``HF_DATASETS_CACHE``, keyed by path and modification time, so edited files are re-read).
Documents without any non-whitespace character are dropped; ``data.max_documents`` keeps the
first N remaining ones.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from contextlib import contextmanager
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distllm.config import DataConfig
from distllm.errors import DataError

STDLIB = "python-stdlib"
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""Local file suffix -> ``datasets`` builder."""


def load_corpus(cfg: DataConfig) -> datasets.Dataset:
    """All non-empty documents of ``cfg.source`` (at most ``cfg.max_documents``), column ``text``."""
    if cfg.source == STDLIB:
        origin = f"{STDLIB} ({stdlib_dir()})"
        ds = _load_files(stdlib_files(), "text", "text", origin)
    elif (files := local_files(cfg.source)) is not None:
        origin = cfg.source
        ds = _load_files(files, _builder(files, cfg.source), cfg.text_field, origin)
    else:
        origin = f"Hugging Face dataset '{_hub_name(cfg.source)}'"
        ds = _load_hub(cfg)
    keep = _nonempty_indices(ds)
    if cfg.max_documents is not None:
        keep = keep[: cfg.max_documents]
    if len(keep) == 0:
        raise DataError(f"corpus {origin} is empty: it has no document with non-whitespace text (data.source)")
    if len(keep) < len(ds):
        ds = ds.select(keep)
    return ds


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
            if f.is_file()
            and f.suffix in BUILDERS
            and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"no {_suffixes()} files in corpus directory {path} (data.source)")
        return files
    if glob.has_magic(source):
        files = sorted(f for f in glob.glob(str(path), recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"no files match the corpus pattern {source} (data.source)")
        return files
    if path.suffix in BUILDERS or source.startswith(("/", ".", "~")):
        raise DataError(f"corpus not found: {source} (data.source)")
    return None


def _suffixes() -> str:
    return ", ".join(BUILDERS)


def _builder(files: list[str], source: str) -> str:
    suffixes = sorted({Path(f).suffix for f in files})
    unknown = [s for s in suffixes if s not in BUILDERS]
    if unknown:
        raise DataError(
            f"corpus {source} has unsupported file type {unknown[0] or '(none)'}; use {_suffixes()} (data.source)"
        )
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise DataError(f"corpus {source} mixes {', '.join(suffixes)} files; point data.source at one kind")
    return builders.pop()


def _load_files(files: list[str], builder: str, field: str, origin: str) -> datasets.Dataset:
    if builder != "text":
        files = [f for f in files if os.path.getsize(f) > 0]  # the json builder fails on empty files
        if not files:
            raise DataError(f"corpus {origin} is empty: its files have no data (data.source)")
    kwargs: dict = {}
    if builder == "text":
        kwargs = {"sample_by": "document", "encoding_errors": "replace"}  # non-UTF-8 bytes -> U+FFFD
    elif builder == "parquet":
        names = pq.read_schema(files[0]).names
        if field not in names:
            raise _missing_field(field, names, files[0] if len(files) == 1 else f"{origin} ({files[0]})")
        kwargs = {"columns": [field]}
    try:
        with _quiet_datasets():  # converting local files is quick; its "Downloading data" bar only confuses
            ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as e:  # malformed JSON/Parquet surfaces as many different exception types
        while e.__cause__ is not None:  # DatasetGenerationError wraps the informative parser error
            e = e.__cause__
        raise DataError(f"could not read corpus {origin}: {_first_line(e)}") from None
    return _text_column(ds, "text" if builder == "text" else field, origin)


def _hub_name(source: str) -> str:
    return source[3:] if source.startswith("hf:") else source


def _load_hub(cfg: DataConfig) -> datasets.Dataset:
    name = _hub_name(cfg.source)
    origin = f"Hugging Face dataset '{name}'"
    try:
        if cfg.max_documents is None:
            ds = datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split)
        else:  # stream only the first documents instead of downloading everything
            stream = datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split, streaming=True)
            texts = []
            for row in stream:
                if cfg.text_field not in row:
                    raise _missing_field(cfg.text_field, list(row), origin)
                text = row[cfg.text_field]
                if isinstance(text, str) and text.strip():
                    texts.append(text)
                    if len(texts) >= cfg.max_documents:
                        break
            ds = datasets.Dataset.from_dict(
                {cfg.text_field: texts}, features=datasets.Features({cfg.text_field: datasets.Value("string")})
            )
    except DataError:
        raise
    except Exception as e:  # ConnectionError, DatasetNotFoundError, bad config/split names, HTTP errors ...
        where = f"config {cfg.hf_config!r}, split {cfg.hf_split!r}"
        raise DataError(
            f"could not load Hugging Face dataset '{name}' ({where}) and data.source is not a local path: "
            f"{type(e).__name__}: {_first_line(e)} (offline? use a local path)"
        ) from None
    return _text_column(ds, cfg.text_field, origin)


# --------------------------------------------------------------------------- columns and rows


def _missing_field(field: str, names: list[str], origin: str) -> DataError:
    return DataError(
        f"field '{field}' not found in {origin} (it has: {', '.join(map(str, names)) or 'no fields'}); "
        "set data.text_field"
    )


def _text_column(ds: datasets.Dataset, field: str, origin: str) -> datasets.Dataset:
    """Keep only ``field``, checked to hold text, renamed to ``text``."""
    if field not in ds.column_names:
        raise _missing_field(field, ds.column_names, origin)
    feature = ds.features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(f"field '{field}' in {origin} holds {feature}, not text; set data.text_field")
    ds = ds.select_columns([field])
    return ds.rename_column(field, "text") if field != "text" else ds


def _nonempty_indices(ds: datasets.Dataset) -> np.ndarray:
    """Row indices of documents that contain a non-whitespace character (vectorized, batch by batch)."""
    keep, offset = [], 0
    for batch in ds.with_format("arrow").iter(batch_size=10_000):
        column: pa.ChunkedArray | pa.Array = batch["text"]
        mask = pc.fill_null(pc.match_substring_regex(column, r"\S"), False)
        keep.append(np.flatnonzero(mask.to_numpy(zero_copy_only=False)) + offset)
        offset += len(column)
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)


@contextmanager
def _quiet_datasets():
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
