"""``distllm contamination CONFIG --tasks A.jsonl,...``: which evaluation items were in the training data.

The method of GPT-3 (Brown et al. 2020, appendix C), as lm-evaluation-harness's decontamination
"janitor" also implements it: text is normalized (ASCII letters lowercased and ASCII punctuation
removed, as the janitor does, then split on ASCII whitespace into words); an evaluation item (its context + the correct choice, or + every choice
with ``all_choices``) is contaminated when any of its N-grams of words (N = 13 by default) occurs in a
training document; an item of fewer than N words is looked for whole.

What is checked is what the model trained on: the train split of the prepared shards of
``data.dir`` (local or ``s3://``, through ``TokenShards``), decoded back to text (the tokenizer is
byte-level and lossless; documents are split at ``<|endoftext|>``). The evaluation side is small and
goes into a table of hashed n-grams; the corpus streams past it, never the other way round:

* the token stream is cut into units of ``UNIT_TOKENS`` (256k); a unit scans the documents that start in it
  (reading on past its end to finish the last one), so memory is one unit plus the table, whatever
  the corpus size; units run in worker processes (``num_proc``), in stream order, shard by shard;
* a unit turns its tokens into UTF-8 bytes with two numpy gathers (``tokenizer.token_bytes`` as a table),
  normalizes all its bytes at once with numpy lookup tables (UTF-8 multi-byte characters hold no
  ASCII bytes, so they pass unchanged), splits them into words, hashes every word (Python's ``hash``), and forms rolling 64-bit
  hashes of every k-gram for each k in use (N, and the lengths of shorter items) with numpy; a 2**24-bit
  filter of the table's hashes passes a few candidates, which are checked word by word, so a hash
  collision never reports a false hit.

The report lists, per task, the dirty items and the clean subset's indices, and per item whether it
is dirty, the fraction of its n-grams found, and its first hits (shard, document index in the split,
an excerpt of the training text). ``decontaminate`` writes new shards without the documents that
hold any hit, and a manifest that records where they came from; the source is only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from distllm.errors import ConfigError, DataError
from distllm.eval.tasks import Task

DEFAULT_N = 13
UNIT_TOKENS = 1 << 18
"""Tokens of the stream per unit of work (a worker holds about 20 bytes per token of a unit at once;
small units keep the processes evenly busy)."""
HITS_PER_ITEM = 3
EXCERPT_CHARS = 60
"""Characters of training text shown on each side of a hit."""
FILTER_BITS = 24
MAX_TABLE_WIDTH = 256
"""Tokens of at most this many bytes are decoded through a (vocab, width) table."""
_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[ord("A") : ord("Z") + 1] += 32
_KEEP = np.ones(256, dtype=bool)
_KEEP[np.frombuffer(string.punctuation.encode(), dtype=np.uint8)] = False
_PUNCTUATION_BYTES = string.punctuation.encode()
_SEPARATOR = b"\x00"  # stands for <|endoftext|> while a unit's text is normalized as one string
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: the rolling hash h_k = h_{k-1} * M + word hash (mod 2**64)


def normalize_bytes(data: np.ndarray) -> bytes:
    """UTF-8 bytes (uint8 array) with ASCII letters lowercased and ASCII punctuation removed."""
    lowered = _LOWER[data]
    return lowered[_KEEP[lowered]].tobytes()


def normalize(text: str | bytes) -> list[bytes]:
    """GPT-3 appendix C: lowercase, remove punctuation, split on whitespace (words as UTF-8 bytes)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return normalize_bytes(np.frombuffer(data, dtype=np.uint8)).split()


def ngrams(words: list[bytes], n: int) -> list[tuple[bytes, ...]]:
    """The n-grams of ``words``; the whole sequence when it is shorter than n (none when empty)."""
    if len(words) < n:
        return [tuple(words)] if words else []
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


# --------------------------------------------------------------------------- the evaluation side


@dataclass
class Probe:
    """Every distinct n-gram of every item (``grams``), and which grams each item has."""

    n: int
    grams: list[tuple[bytes, ...]]
    item_grams: list[np.ndarray]
    """Global item index (tasks in order, items in order) -> its gram ids."""
    items: list[tuple[int, int]]
    """Global item index -> (task index, item index)."""

    @property
    def lengths(self) -> list[int]:
        return sorted({len(g) for g in self.grams})


def item_texts(task: Task, all_choices: bool) -> list[list[str]]:
    """The texts of each item that are checked: context + correct choice (or + each choice)."""
    out = []
    for item in task.items:
        picks = item.choices if all_choices else [item.choices[item.gold]]
        out.append([f"{item.context} {choice}" for choice in picks])
    return out


def build_probe(tasks: list[Task], n: int = DEFAULT_N, all_choices: bool = False) -> Probe:
    if n < 1:
        raise ConfigError(f"--ngram must be >= 1, got {n}")
    index: dict[tuple[bytes, ...], int] = {}
    item_grams, items = [], []
    for t, task in enumerate(tasks):
        for item, texts in zip(task.items, item_texts(task, all_choices)):
            ids = {index.setdefault(g, len(index)) for text in texts for g in ngrams(normalize(text), n)}
            item_grams.append(np.array(sorted(ids), dtype=np.int64))
            items.append((t, item.index))
    return Probe(n=n, grams=list(index), item_grams=item_grams, items=items)


# --------------------------------------------------------------------------- the worker side

_state: dict = {}


def _hash_words(words: list[bytes]) -> np.ndarray:
    return np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)


def _gram_hashes(grams: list[tuple[bytes, ...]]) -> np.ndarray:
    """(len(grams),) uint64: each gram's rolling hash, the value ``_match`` computes for its words."""
    out = np.zeros(len(grams), dtype=np.uint64)
    by_length: dict[int, list[int]] = {}
    for gid, gram in enumerate(grams):
        by_length.setdefault(len(gram), []).append(gid)
    with np.errstate(over="ignore"):
        for k, ids in by_length.items():
            words = _hash_words([w for gid in ids for w in grams[gid]]).reshape(len(ids), k)  # (m, k)
            h = np.zeros(len(ids), dtype=np.uint64)
            for j in range(k):
                h = h * _MULTIPLIER + words[:, j]
            out[ids] = h
    return out


def _decoding_tables(tokenizer_path) -> dict:
    """The token -> bytes pieces (``<|endoftext|>`` -> the separator word) and, when every token is at
    most ``MAX_TABLE_WIDTH`` bytes, the same as a (vocab, width) byte table with its valid mask."""
    from distllm.tokenizer import eot_id, load_tokenizer, token_bytes

    tok = load_tokenizer(tokenizer_path)
    pieces = token_bytes(tok)
    pieces[eot_id(tok)] = b" " + _SEPARATOR + b" "
    width = max(len(p) for p in pieces)
    rows = valid = None
    if width <= MAX_TABLE_WIDTH:
        rows = np.zeros((len(pieces), width), dtype=np.uint8)
        valid = np.zeros((len(pieces), width), dtype=bool)
        for i, p in enumerate(pieces):
            rows[i, : len(p)] = np.frombuffer(p, dtype=np.uint8)
            valid[i, : len(p)] = True
    return {"pieces": pieces, "rows": rows, "valid": valid}


def _init_scan(data_dir: str, storage: dict, probe: Probe, verify: bool, tables: dict, gram_items: dict,
               shards=None) -> None:
    """Per process: the shards (the main process's, inherited by a forked worker, or opened anew), and
    the hashed gram table with its filter (the hashes are Python's ``hash``, salted per interpreter, so
    each process makes its own); ``tables`` and ``gram_items`` come made by the main process."""
    from distllm.data.loader import TokenShards

    if shards is None:
        shards = TokenShards(data_dir, "train", verify=verify, storage=storage)
    table: dict[int, list[int]] = {}
    for gid, h in enumerate(_gram_hashes(probe.grams).tolist()):
        table.setdefault(h, []).append(gid)
    bits = np.zeros(1 << FILTER_BITS, dtype=bool)
    if table:
        bits[np.array(list(table), dtype=np.uint64) & np.uint64((1 << FILTER_BITS) - 1)] = True
    _state.update(shards=shards, **tables, table=table, bits=bits, probe=probe, gram_items=gram_items,
                  lengths_in_use=probe.lengths, separator=hash(_SEPARATOR))


def _read_unit(shards, start: int, stop: int, eot: int) -> tuple[np.ndarray, int]:
    """Tokens from the first document start in [start, stop) to the end of the last document that
    starts before ``stop`` (its ``<|endoftext|>`` included), and the stream offset of the first one.
    Empty when no document starts in the range."""
    total = shards.num_tokens
    head = max(start - 1, 0)
    tokens = shards.window(head, min(stop, total) - head)
    first = 0 if start == 0 else None  # index in ``tokens`` of the first document start
    if first is None:
        eots = np.flatnonzero(tokens == eot)
        if not eots.size or eots[0] + 1 >= len(tokens):
            return tokens[:0], stop
        first = int(eots[0]) + 1
    tail = [tokens]
    end = min(stop, total)
    while end < total and tail[-1].size and tail[-1][-1] != eot:  # finish the last document
        more = shards.window(end, min(UNIT_TOKENS, total - end))
        hit = np.flatnonzero(more == eot)
        tail.append(more if not hit.size else more[: hit[0] + 1])
        end += len(tail[-1])
        if hit.size:
            break
    tokens = np.concatenate(tail) if len(tail) > 1 else tokens
    return tokens[first:], head + first


def _decode(tokens: np.ndarray) -> bytes:
    """UTF-8 bytes of ``tokens`` (``<|endoftext|>`` -> the separator word): each token's row of a
    (vocab, width) byte table, the padding masked out (or a join when some token is very long)."""
    s = _state
    if s["rows"] is None:
        return b"".join(map(s["pieces"].__getitem__, tokens.tolist()))
    step = max(1, (16 << 20) // s["rows"].shape[1])  # about 16 MB of rows at once
    return b"".join(s["rows"][t][s["valid"][t]].tobytes() for t in (tokens[i : i + step] for i in range(0, len(tokens), step)))


def scan_unit(unit: tuple[int, int, int]) -> dict:
    """Scan the documents that start in stream range [start, stop); see the module doc."""
    u, start, stop = unit
    s = _state
    shards = s["shards"]
    tokens, first = _read_unit(shards, start, stop, shards.eot_id)
    result = {"unit": u, "documents": 0, "text_bytes": 0, "found": {}, "hits": {}, "dirty": []}
    if not tokens.size:
        return result
    eot_at = np.flatnonzero(tokens == shards.eot_id)  # each ends a document
    ends = eot_at.tolist() if tokens[-1] == shards.eot_id else [*eot_at.tolist(), len(tokens)]  # exclusive
    doc_starts = np.array([0] + [e + 1 for e in ends[:-1]], dtype=np.int64)  # token index of each document
    raw = _decode(tokens)
    result["documents"] = len(ends)
    result["text_bytes"] = len(raw) - 3 * len(eot_at)
    words = normalize_bytes(np.frombuffer(raw, dtype=np.uint8)).split()
    hashes = _hash_words(words)
    seps = np.flatnonzero(hashes == np.uint64(s["separator"] & 0xFFFFFFFFFFFFFFFF))
    seps = seps[[words[i] == _SEPARATOR for i in seps.tolist()]] if seps.size else seps
    if len(seps) != len(eot_at):  # a document holds a separator-like word: scan document by document
        return _scan_by_document(result, tokens, first, doc_starts, ends)
    bounds = np.concatenate([[0], seps + 1, [len(words)]]) if len(ends) > len(seps) else np.concatenate([[0], seps + 1])
    is_sep = np.zeros(len(words) + 1, dtype=np.int64)
    is_sep[seps] = 1
    sep_before = np.concatenate([[0], np.cumsum(is_sep[:-1])])  # separators among words [0, i)
    hits = _match(words, hashes, sep_before)
    _record(result, hits, words, bounds, tokens, first, doc_starts, ends, raw_text=None)
    return result


def _scan_by_document(result, tokens, first, doc_starts, ends) -> dict:
    """The slow path: each document normalized and matched on its own."""
    for d, (a, e) in enumerate(zip(doc_starts.tolist(), ends)):
        text = _decode(tokens[a:e])
        words = normalize(text)
        hits = _match(words, _hash_words(words), np.zeros(len(words) + 1, dtype=np.int64))
        if hits:
            bounds = np.array([0, len(words)])
            _record(result, hits, words, bounds, tokens[a : e + 1], first + a, np.array([0]), [e - a],
                    raw_text=text, doc_offset=d)
    return result


def _match(words: list[bytes], hashes: np.ndarray, sep_before: np.ndarray) -> list[tuple[int, int, int]]:
    """(gram id, first word, length) of every occurrence of a table gram inside one document."""
    s = _state
    table, bits, grams = s["table"], s["bits"], s["probe"].grams
    mask = np.uint64((1 << FILTER_BITS) - 1)
    out = []
    wanted = set(s["lengths_in_use"])
    n = max(wanted, default=0)
    acc = hashes.copy()  # acc[i] = hash of the k words from i (k = 1, 2, ...), updated in place
    slot = np.empty_like(acc)
    with np.errstate(over="ignore"):
        for k in range(1, min(n, len(hashes)) + 1):
            if k > 1:
                acc = acc[:-1]
                np.multiply(acc, _MULTIPLIER, out=acc)
                np.add(acc, hashes[k - 1 :], out=acc)
            if k not in wanted:
                continue
            np.bitwise_and(acc, mask, out=slot[: len(acc)])
            candidates = np.flatnonzero(bits[slot[: len(acc)]])
            if not candidates.size:
                continue
            inside = sep_before[candidates + k] - sep_before[candidates] == 0  # no separator among the k words
            for i in candidates[inside].tolist():
                for gid in table.get(int(acc[i]), ()):
                    if len(grams[gid]) == k and tuple(words[i : i + k]) == grams[gid]:
                        out.append((gid, i, k))
    return out


def _record(result, hits, words, bounds, tokens, first, doc_starts, ends, raw_text, doc_offset=0) -> None:
    """Fold a unit's hits into ``result``: grams found, dirty documents, the first hits per item."""
    s = _state
    gram_items = s["gram_items"]
    doc_of = np.searchsorted(bounds, [i for _, i, _ in hits], side="right") - 1
    dirty = set()
    for (gid, i, k), d in zip(hits, doc_of.tolist()):
        result["found"][gid] = result["found"].get(gid, 0) + 1
        dirty.add(d)
        for item in gram_items.get(gid, ()):
            shown = result["hits"].setdefault(item, [])
            if len(shown) < HITS_PER_ITEM and all(h["doc"] != d + doc_offset for h in shown):
                a, e = int(doc_starts[d]), int(ends[d])
                text = raw_text if raw_text is not None else _decode(tokens[a:e])
                shown.append({"doc": d + doc_offset, "excerpt": excerpt(text, i - int(bounds[d]), k)})
    for d in sorted(dirty):
        a, e = int(doc_starts[d]), int(ends[d])
        result["dirty"].append((d + doc_offset, first + a, first + min(e + 1, len(tokens))))  # with its EOT


def excerpt(text: bytes, word: int, k: int) -> str:
    """The training text (UTF-8 bytes) around its normalized words [word, word + k), on one line, the
    matched words in brackets."""
    spans = [m.span() for m in re.finditer(rb"\S+", text) if m.group().translate(None, _PUNCTUATION_BYTES)]
    if word + k > len(spans):
        return b" ".join(normalize(text)[word : word + k]).decode("utf-8", errors="replace")
    a, b = spans[word][0], spans[word + k - 1][1]
    lo, hi = max(0, a - EXCERPT_CHARS), min(len(text), b + EXCERPT_CHARS)

    def show(x: bytes) -> str:
        return x.decode("utf-8", errors="ignore")  # a cut through a character drops it

    out = ("..." if lo else "") + show(text[lo:a]) + "[" + show(text[a:b]) + "]" + show(text[b:hi]) + \
        ("..." if hi < len(text) else "")
    return " ".join(out.split())


# --------------------------------------------------------------------------- the check


def check(data_dir: str, tasks: list[Task], n: int = DEFAULT_N, all_choices: bool = False, num_proc: int = 0,
          storage: Optional[dict] = None, verify: bool = True, progress: bool = True,
          unit_tokens: int = UNIT_TOKENS) -> tuple[dict, list[tuple[int, int]]]:
    """Check ``tasks`` against the train split of ``data_dir``: (report, dirty document stream ranges).
    The report's ``seconds`` run from here (after the imports) to the last document scanned."""
    from distllm.data.loader import TokenShards
    from distllm.data.workers import run_tasks
    from distllm.eval.progress import Progress

    t0 = time.perf_counter()
    probe = build_probe(tasks, n, all_choices)
    shards = TokenShards(data_dir, "train", verify=verify, storage=storage)  # only its manifest is read here
    total = shards.num_tokens
    units = [(u, a, min(a + unit_tokens, total)) for u, a in enumerate(range(0, total, unit_tokens))]
    gram_items: dict[int, list[int]] = {}  # gram id -> the items that have it
    for i, gids in enumerate(probe.item_grams):
        for g in gids.tolist():
            gram_items.setdefault(g, []).append(i)
    num_proc = num_proc or _cpu_count()
    inherit = num_proc == 1 or len(units) <= 1 or sys.platform == "linux"  # in this process, or forked
    init = (data_dir, storage or {}, probe, verify, _decoding_tables(shards.tokenizer_path), gram_items,
            shards if inherit else None)
    results: dict[int, dict] = {}
    try:
        with Progress(total, "contamination", unit="tok", enabled=progress) as bar, \
                run_tasks(scan_unit, units, num_proc, _init_scan, init) as done:
            for r in done:
                results[r["unit"]] = r
                bar.update(units[r["unit"]][2] - units[r["unit"]][1], r["text_bytes"])
    finally:
        _state.clear()
    seconds = time.perf_counter() - t0
    report, dirty = _report(shards, tasks, probe, [results[u] for u, _, _ in units], seconds, all_choices)
    report["data_dir"] = str(data_dir)
    report["manifest_sha256"] = _manifest_sha256(shards)
    shards.close()
    return report, dirty


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _manifest_sha256(shards) -> str:
    from distllm.data.shards import MANIFEST

    return hashlib.sha256(Path(shards.local_file(MANIFEST)).read_bytes()).hexdigest()


def _report(shards, tasks: list[Task], probe: Probe, results: list[dict], seconds: float,
            all_choices: bool) -> tuple[dict, list[tuple[int, int]]]:
    doc_offset, found, first_hits, dirty = 0, set(), {}, []
    starts = shards.shard_starts  # stream offset of each shard
    names = shards.shard_files
    for r in results:
        found.update(r["found"])
        for item, hits in r["hits"].items():
            shown = first_hits.setdefault(item, [])
            for h in hits:
                if len(shown) < HITS_PER_ITEM:
                    shown.append({"document": doc_offset + h["doc"], "excerpt": h["excerpt"]})
        for d, a, e in r["dirty"]:
            dirty.append((a, e))
        r["doc_offset"] = doc_offset
        doc_offset += r["documents"]
    # the shard of each hit: where its document starts
    doc_start = {doc_offset_r["doc_offset"] + d: a for doc_offset_r in results for d, a, _ in doc_offset_r["dirty"]}
    for hits in first_hits.values():
        for h in hits:
            a = doc_start.get(h["document"])
            h["shard"] = names[int(np.searchsorted(starts, a, side="right")) - 1] if a is not None else None
            h["token_offset"] = int(a) if a is not None else None
    text_bytes = sum(r["text_bytes"] for r in results)
    report = {
        "method": "GPT-3 appendix C: lowercase, ASCII punctuation removed, whitespace words; an item "
                  "(context + correct choice" + (", and + every choice" if all_choices else "") +
                  f") is dirty if any of its {probe.n}-grams (the whole item if shorter) is in a training document",
        "n": probe.n, "all_choices": all_choices, "split": "train",
        "tokens": int(shards.num_tokens), "documents": doc_offset, "text_bytes": text_bytes,
        "seconds": round(seconds, 3), "mb_per_s": round(text_bytes / 1e6 / seconds, 3) if seconds else None,
        "dirty_documents": len(dirty), "dirty_tokens": int(sum(e - a for a, e in dirty)),
        "tasks": {},
    }
    g = 0
    for t, task in enumerate(tasks):
        per_item, dirty_idx = [], []
        for item in task.items:
            gids = probe.item_grams[g]
            hit = [int(x) for x in gids.tolist() if x in found]
            entry = {"index": item.index, "dirty": bool(hit), "ngrams": int(len(gids)),
                     "found": len(hit), "fraction": round(len(hit) / len(gids), 6) if len(gids) else 0.0}
            if hit:
                entry["hits"] = first_hits.get(g, [])
                dirty_idx.append(item.index)
            per_item.append(entry)
            g += 1
        dirty_set = set(dirty_idx)
        report["tasks"][task.name] = {
            "file": task.path, "sha256": task.sha256, "items": len(task.items), "dirty": len(dirty_idx),
            "dirty_fraction": len(dirty_idx) / len(task.items),
            "dirty_indices": dirty_idx,
            "clean_indices": [i.index for i in task.items if i.index not in dirty_set],
            "per_item": per_item,
        }
    return report, sorted(dirty)


def summary(report: dict) -> str:
    """The human-readable form of a report."""
    lines = [f"contamination check of {report['data_dir']} ({report['split']}: {report['tokens']:,} tokens, "
             f"{report['documents']:,} documents, {report['text_bytes'] / 1e6:.1f} MB of text) with "
             f"{report['n']}-grams: {report['seconds']:.1f} s, {report['mb_per_s']:.2f} MB/s",
             f"{'task':<24} {'items':>7} {'dirty':>7} {'dirty %':>8}"]
    for name, t in report["tasks"].items():
        lines.append(f"{name:<24} {t['items']:>7} {t['dirty']:>7} {100 * t['dirty_fraction']:>7.2f}%")
        for entry in [e for e in t["per_item"] if e["dirty"]][:3]:
            h = entry["hits"][0] if entry.get("hits") else None
            where = f"{h['shard']} document {h['document']}: {h['excerpt'][:150]}" if h else ""
            lines.append(f"    item {entry['index']}: {entry['found']}/{entry['ngrams']} n-grams found; {where}")
        if t["dirty"] > 3:
            lines.append(f"    ... and {t['dirty'] - 3} more dirty items")
    if report["dirty_documents"]:
        lines.append(f"{report['dirty_documents']} training documents ({report['dirty_tokens']:,} tokens) hold "
                     "contaminated text (--decontaminate OUT_DIR writes shards without them)")
    return "\n".join(lines)


def write_report(report: dict, path: str | os.PathLike) -> Path:
    from distllm.data.shards import write_durably

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, json.dumps(report, indent=1) + "\n")
    return path


# --------------------------------------------------------------------------- decontamination


def decontaminate(data_dir: str, out_dir: str, dirty: list[tuple[int, int]], report: dict, shard_tokens: int,
                  storage: Optional[dict] = None) -> dict:
    """Write ``out_dir``: the shards of ``data_dir`` without the token ranges ``dirty`` (whole documents)
    in the train split, the val split and tokenizer as they are, and a manifest recording where they came
    from. ``data_dir`` is only read. Returns the new manifest."""
    from distllm.data.loader import TokenShards
    from distllm.data.output import open_output
    from distllm.data.shards import MANIFEST, SPLITS, TOKENIZER_FILE, load_manifest
    from distllm.data.storage import is_url

    same = os.path.abspath(str(out_dir)) == os.path.abspath(str(data_dir)) if not is_url(out_dir) else \
        str(out_dir).rstrip("/") == str(data_dir).rstrip("/")
    if same:
        raise ConfigError(f"--decontaminate {out_dir} is the source data.dir; choose a new directory (the source is "
                          "never modified)")
    staging = Path(os.environ.get("TMPDIR", "/tmp")) / f"distllm-decontaminate-{os.getpid()}"
    out = open_output(str(out_dir), staging, (storage or {}).get("storage_options"))
    if out.read_bytes(MANIFEST) is not None or (not is_url(out_dir) and Path(out_dir).is_dir() and any(Path(out_dir).iterdir())):
        raise ConfigError(f"--decontaminate {out_dir} already exists and is not empty; choose a new directory")
    out.prepare()
    source = {s: TokenShards(data_dir, s, verify=True, storage=storage) for s in SPLITS}
    manifest = load_manifest(source["train"].local_file(MANIFEST))
    fp = source["train"].fingerprint
    dtype = np.dtype(manifest["dtype"])
    out.put_text(TOKENIZER_FILE, Path(source["train"].tokenizer_path).read_text(encoding="utf-8"))
    splits = {}
    for split in SPLITS:
        drop = dirty if split == "train" else []
        entries, kept_tokens = _write_split(source[split], out, split, drop, shard_tokens, fp, dtype)
        docs = manifest["splits"][split]["num_documents"] - (len(drop) if split == "train" else 0)
        splits[split] = {"num_tokens": kept_tokens, "num_documents": docs, "shards": entries}
        source[split].close()
    dropped_tokens = int(sum(e - a for a, e in dirty))
    new = {
        "format_version": manifest["format_version"],
        "source": f"{data_dir} without contaminated documents",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": manifest["tokenizer"],
        "dtype": manifest["dtype"],
        "splits": splits,
        "decontamination": {
            "source_dir": str(data_dir),
            "source_manifest_sha256": report.get("manifest_sha256"),
            "tasks": [{"name": name, "file": t["file"], "sha256": t["sha256"], "items": t["items"],
                       "dirty_items": t["dirty"]} for name, t in report["tasks"].items()],
            "n": report["n"], "all_choices": report["all_choices"], "split": "train",
            "documents_dropped": len(dirty), "tokens_dropped": dropped_tokens,
            "documents_kept": splits["train"]["num_documents"], "tokens_kept": splits["train"]["num_tokens"],
        },
    }
    out.put_text(MANIFEST, json.dumps(new, indent=2) + "\n")  # last: marks the directory complete
    return new


def _write_split(shards, out, split: str, drop: list[tuple[int, int]], shard_tokens: int, fp: str,
                 dtype: np.dtype) -> tuple[list[dict], int]:
    """Copy a split's token stream to ``out`` minus the ranges ``drop``, in shards of ``shard_tokens``."""
    keep, pos = [], 0  # stream ranges to keep
    for a, e in sorted(drop):
        if a > pos:
            keep.append((pos, a))
        pos = max(pos, e)
    if pos < shards.num_tokens:
        keep.append((pos, shards.num_tokens))
    buffer = np.empty(shard_tokens, dtype=dtype)
    filled, entries, written = 0, [], 0
    for a, e in keep:
        while a < e:
            n = min(e - a, shard_tokens - filled, UNIT_TOKENS)
            buffer[filled : filled + n] = shards.window(a, n)
            filled, a = filled + n, a + n
            if filled == shard_tokens:
                entries.append(out.write_shard(f"{split}_{len(entries):06d}.bin", buffer[:filled], fp))
                written, filled = written + filled, 0
    if filled or not entries:
        entries.append(out.write_shard(f"{split}_{len(entries):06d}.bin", buffer[:filled], fp))
        written += filled
    return entries, written


def load_report(path: str | os.PathLike) -> dict:
    """A contamination report written by ``distllm contamination`` (for ``eval --contamination``)."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"contamination report not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"contamination report {path} is not readable JSON ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("tasks"), dict):
        raise DataError(f"{path} is not a report of `distllm contamination` (no 'tasks')")
    return report


def run_contamination(cfg, task_files: str, n: int = DEFAULT_N, all_choices: bool = False, out: Optional[str] = None,
                      decontaminate_to: Optional[str] = None) -> dict:
    """``distllm contamination CONFIG --tasks ...``: check, write the report, print the summary, and
    with ``decontaminate_to`` write the decontaminated shards there."""
    from distllm.data.storage import storage_kwargs
    from distllm.eval.tasks import load_tasks

    tasks = load_tasks(task_files)
    storage = storage_kwargs(cfg.data)
    report, dirty = check(cfg.data.dir, tasks, n, all_choices, num_proc=cfg.data.num_proc or 0, storage=storage,
                          verify=cfg.data.verify_shards, progress=cfg.logging.progress)
    path = write_report(report, out or Path(cfg.run.dir) / "contamination.json")
    print(summary(report))
    print(f"wrote {path}")
    if decontaminate_to:
        manifest = decontaminate(cfg.data.dir, decontaminate_to, dirty, report, cfg.data.shard_tokens, storage)
        d = manifest["decontamination"]
        print(f"wrote {decontaminate_to}: {d['documents_dropped']} documents ({d['tokens_dropped']:,} tokens) "
              f"dropped, {d['documents_kept']} ({d['tokens_kept']:,} tokens) kept; train on it with "
              f"--data.dir={decontaminate_to}")
    return report
