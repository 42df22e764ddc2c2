"""SFT data: conversations -> tokens + response mask -> N fixed-shape samples of T positions.

Split: an example is validation iff the first 8 bytes of the BLAKE2b-128 of its canonical JSON
(``dedup.doc_hash``) fall below ``val_fraction * 2**64`` (moved just enough to keep one example on
each side, ``dedup.split_threshold``), like the pretraining documents: the same conversation always
lands in the same split, whatever else the data holds.

Tokens: ``ChatTemplate.encode`` renders each conversation and marks its response tokens (every
assistant turn and the end-of-sequence token after it). An example of L tokens gives L - 1
positions: inputs ``ids[:-1]``, labels ``ids[1:]`` where the label is a response token, else -100
(prompt, system, user). An example longer than T + 1 tokens is cut to T + 1 (``overlong="truncate"``)
or left out (``"drop"``); one with no response token left is dropped; both are counted.

Samples: with ``packing`` the examples are packed into rows of T positions by best-fit decreasing
(deterministic: by length, ties by example order) and each row's ``doc_ids`` number its examples
0, 1, ... so that the document mask keeps attention inside each example; without it each example
has a row of its own. The rest of a row is padding: the end-of-sequence id as input, -100 as label,
and a document id of its own. Labels come from the response mask, never from comparing ids with
the padding id, so the real end-of-sequence tokens are learned even though padding uses the same
id (TRL #1623).

``SFTDataset.read(ids)`` gives ``input_ids`` (n, T) int64, ``labels`` (n, T) int64 (aligned with the
inputs: ``labels[:, t]`` is the token to predict after ``input_ids[:, t]``) and ``doc_ids`` (n, T) int32;
``data_id`` is a sha256 over everything that determines the samples.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from distllm.chat import ChatTemplate
from distllm.data.dedup import base_threshold, doc_hash, split_threshold
from distllm.data.instructions import Example, read_examples
from distllm.errors import ConfigError, DataError
from distllm.tokenizer import eot_id

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
IGNORE = -100
OVERLONG = ("truncate", "drop")


@dataclass
class TokenizedExamples:
    """Examples as one flat token array: example i is ``tokens[offsets[i]:offsets[i + 1]]``."""

    tokens: np.ndarray  # (total,) int32
    mask: np.ndarray  # (total,) bool, True on response tokens
    offsets: np.ndarray  # (n + 1,) int64
    truncated: int = 0
    dropped: int = 0

    @property
    def num_examples(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def tokenize_examples(examples: Iterable[Example], tok: Tokenizer, template: ChatTemplate, seq_len: int,
                      overlong: str = "truncate") -> TokenizedExamples:
    """Encode each example; cut or drop those longer than ``seq_len + 1`` tokens (see the module doc)."""
    if overlong not in OVERLONG:
        raise ConfigError(f"sft.overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
    parts, masks, lengths = [], [], [0]
    truncated = dropped = 0
    for ex in examples:
        try:
            enc = template.encode(tok, ex.messages)
        except DataError as e:
            raise DataError(f"{ex.where}: {e}") from None
        ids, mask = enc.ids, enc.mask
        if len(ids) > seq_len + 1:
            if overlong == "drop":
                dropped += 1
                continue
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            truncated += 1
        if not mask[1:].any():  # nothing left to learn (a first token is never a label)
            dropped += 1
            continue
        parts.append(ids.astype(np.int32))
        masks.append(mask)
        lengths.append(len(ids))
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    mask = np.concatenate(masks) if masks else np.zeros(0, bool)
    return TokenizedExamples(tokens, mask, np.cumsum(lengths, dtype=np.int64), truncated, dropped)


def pack(sizes: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: rows (lists of item indices, ascending) of total size <= ``capacity``.

    Items are placed longest first (ties: lower index first), each into the fullest row it still
    fits, else a new row; deterministic for given sizes."""
    if len(sizes) and int(np.max(sizes)) > capacity:
        raise ValueError(f"an item of size {int(np.max(sizes))} exceeds the capacity {capacity}")
    order = np.lexsort((np.arange(len(sizes)), -np.asarray(sizes)))
    free: list[tuple[int, int]] = []  # (remaining capacity, row), sorted
    rows: list[list[int]] = []
    for i in order.tolist():
        size = int(sizes[i])
        k = bisect.bisect_left(free, (size, -1))
        if k < len(free):
            remaining, r = free.pop(k)
        else:
            remaining, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        bisect.insort(free, (remaining - size, r))
    return [sorted(r) for r in rows]


class SFTDataset:
    """``num_samples`` rows of ``seq_len`` positions built from tokenized examples (see the module doc)."""

    def __init__(self, examples: TokenizedExamples, seq_len: int, pad_id: int, packing: bool = True):
        self.examples, self.seq_len, self.pad_id, self.packing = examples, seq_len, pad_id, packing
        positions = examples.lengths() - 1  # (n,) positions each example fills
        rows = pack(positions, seq_len) if packing else [[i] for i in range(examples.num_examples)]
        self.row_offsets = np.cumsum([0] + [len(r) for r in rows], dtype=np.int64)  # (N + 1,)
        self.members = np.asarray([i for r in rows for i in r], dtype=np.int64)  # examples of row j: [ro[j], ro[j+1])
        self.num_samples = len(rows)
        self.data_id = self._fingerprint()
        """sha256 over the format, seq_len, padding id, packing and every token, mask bit and row."""

    def __len__(self) -> int:
        return self.num_samples

    def _fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, "seq_len": self.seq_len, "pad_id": self.pad_id,
                                       "packing": self.packing}, sort_keys=True).encode())
        for a in (self.examples.tokens, self.examples.mask, self.examples.offsets, self.row_offsets, self.members):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def read(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Samples ``ids``: ``input_ids`` (n, T) int64, ``labels`` (n, T) int64, ``doc_ids`` (n, T) int32."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise IndexError(f"samples {ids} out of range [0, {self.num_samples})")
        n, T = len(ids), self.seq_len
        input_ids = np.full((n, T), self.pad_id, dtype=np.int64)
        labels = np.full((n, T), IGNORE, dtype=np.int64)
        doc_ids = np.empty((n, T), dtype=np.int32)
        tokens, mask, offsets = self.examples.tokens, self.examples.mask, self.examples.offsets
        for row, j in enumerate(ids.tolist()):
            pos = 0
            members = self.members[self.row_offsets[j] : self.row_offsets[j + 1]]
            for doc, e in enumerate(members.tolist()):
                a, b = offsets[e], offsets[e + 1]
                m = b - a - 1  # positions of this example
                input_ids[row, pos : pos + m] = tokens[a : b - 1]
                labels[row, pos : pos + m] = np.where(mask[a + 1 : b], tokens[a + 1 : b], IGNORE)
                doc_ids[row, pos : pos + m] = doc
                pos += m
            doc_ids[row, pos:] = len(members)  # padding: a document of its own
        return {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids}

    def stats(self) -> dict:
        """Counts to log: examples, truncated, dropped, rows, tokens (non-padding positions), response
        tokens (positions with a label), fill (tokens / all positions)."""
        positions = int((self.examples.lengths() - 1).sum())
        mask, starts = self.examples.mask, self.examples.offsets[:-1]
        labelled = int(mask.sum()) - int(mask[starts].sum())  # an example's first token is never a label
        return {
            "examples": self.examples.num_examples,
            "truncated": self.examples.truncated,
            "dropped": self.examples.dropped,
            "rows": self.num_samples,
            "tokens": positions,
            "response_tokens": labelled,
            "fill": positions / max(1, self.num_samples * self.seq_len),
        }


# --------------------------------------------------------------------------- train / val


@dataclass
class HeldOutPrompt:
    """A validation conversation up to its last assistant turn (``messages``), and that turn (``reference``)."""

    messages: list[dict]
    reference: str
    where: str


@dataclass
class SFTData:
    train: SFTDataset
    val: SFTDataset
    prompts: list[HeldOutPrompt] = field(default_factory=list)
    """Held-out prompts (from the validation split) answered greedily at each evaluation."""


def example_hash(messages: list[dict]) -> tuple[int, int]:
    """``dedup.doc_hash`` of the conversation's canonical JSON."""
    return doc_hash(json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":")))


def split_examples(examples: list[Example], val_fraction: float, origin: str) -> tuple[list[Example], list[Example]]:
    """(train, val) by content hash (see the module doc)."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"sft.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    his = [example_hash(ex.messages)[0] for ex in examples]
    base = base_threshold(val_fraction)
    threshold = split_threshold(val_fraction, sum(h < base for h in his), len(his), min(his, default=0),
                                max(his, default=0), origin)
    train = [ex for ex, h in zip(examples, his) if h >= threshold]
    val = [ex for ex, h in zip(examples, his) if h < threshold]
    return train, val


def held_out_prompts(examples: list[Example], n: int) -> list[HeldOutPrompt]:
    """The first ``n`` examples as prompts: messages before the last assistant turn, and its text."""
    prompts = []
    for ex in examples[:n]:
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        prompts.append(HeldOutPrompt(ex.messages[:last], ex.messages[last]["content"], ex.where))
    return prompts


def build_sft_data(source: str, tok: Tokenizer, template: ChatTemplate, seq_len: int, packing: bool = True,
                   overlong: str = "truncate", val_fraction: float = 0.05, max_examples: int | None = None,
                   eval_prompts: int = 8) -> SFTData:
    """Read ``source`` (``instructions.read_examples``), split it, tokenize and pack both splits."""
    examples = list(read_examples(source, max_examples))
    train, val = split_examples(examples, val_fraction, f"instruction data {source}")
    pad = eot_id(tok)
    data = SFTData(
        SFTDataset(tokenize_examples(train, tok, template, seq_len, overlong), seq_len, pad, packing),
        SFTDataset(tokenize_examples(val, tok, template, seq_len, overlong), seq_len, pad, packing),
        held_out_prompts(val, eval_prompts),
    )
    for name, ds in (("train", data.train), ("val", data.val)):
        if ds.num_samples == 0:
            raise DataError(f"the {name} split of {source} has no example with a response token within "
                            f"data.seq_len = {seq_len}; raise data.seq_len or use sft.overlong=truncate")
        s = ds.stats()
        log.info(f"sft {name}: {s['examples']} examples ({s['truncated']} truncated, {s['dropped']} dropped) "
                 f"in {s['rows']} rows of {seq_len}, {s['response_tokens']} response tokens, fill {s['fill']:.1%}")
    return data
