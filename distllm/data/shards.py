"""Token shard files and the manifest of a prepared data directory.

A shard is a 64-byte little-endian header followed by the raw tokens::

    offset  size  field
         0     8  magic b"DLLMSHRD"
         8     4  format version (uint32, = 1)
        12     4  token itemsize in bytes (uint32: 2 = uint16, 4 = uint32)
        16     8  number of tokens (uint64)
        24    32  tokenizer fingerprint (raw sha256 digest)
        56     8  zero padding
        64     -  tokens (little-endian uint16 or uint32)

Tokens are uint16 when the vocabulary fits (<= 65536 ids), uint32 otherwise. Shards are read
with ``np.memmap``, never loaded whole.

``manifest.json`` describes a data directory and is written last by ``prepare``, so its
presence marks a complete directory::

    {"format_version": 1, "source": ..., "created": ...,
     "tokenizer": {"file": "tokenizer.json", "fingerprint": ..., "vocab_size": ..., "eot_id": ...},
     "dtype": "uint16",
     "splits": {"train": {"num_tokens": ..., "num_documents": ..., "shards": [{"file", "num_tokens", "sha256"}]},
                "val": {...}}}
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distllm.durable import atomic_file, sha256_file, write_durably
from distllm.errors import DataError
from distllm.tokenizer import fingerprint, load_tokenizer

MAGIC = b"DLLMSHRD"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQ32s")  # 56 bytes, zero-padded to HEADER_SIZE
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return DTYPES[2] if vocab_size <= 2**16 else DTYPES[4]


@dataclass(frozen=True)
class ShardHeader:
    version: int
    itemsize: int
    num_tokens: int
    fingerprint: str
    """Tokenizer fingerprint, sha256 hex."""

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.itemsize]


def write_shard(path: str | os.PathLike, tokens: np.ndarray, fingerprint: str) -> dict:
    """Write ``tokens`` (uint16 or uint32) atomically; return the manifest entry {file, num_tokens, sha256}."""
    path = Path(path)
    itemsize = np.dtype(tokens.dtype).itemsize
    if tokens.ndim != 1 or tokens.dtype.kind != "u" or itemsize not in DTYPES:
        raise ValueError(f"shard tokens must be a 1-D uint16 or uint32 array, got {tokens.dtype}{tokens.shape}")
    data = np.ascontiguousarray(tokens, dtype=DTYPES[itemsize])
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, itemsize, len(data), bytes.fromhex(fingerprint)).ljust(
        HEADER_SIZE, b"\0"
    )
    digest = hashlib.sha256(header)
    digest.update(memoryview(data).cast("B"))
    with atomic_file(path, "wb") as f:  # on disk before the rename (and before any manifest names it)
        f.write(header)
        f.write(memoryview(data).cast("B"))
    return {"file": path.name, "num_tokens": int(len(data)), "sha256": digest.hexdigest()}


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Read and check a shard's header against the file size; DataError naming the file if anything is off."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard not found: {path}; re-run `distllm prepare`")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise DataError(f"shard {path} is truncated: {size} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, itemsize, num_tokens, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DataError(f"{path} is not a distllm shard (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise DataError(f"shard {path} has format version {version}; this distllm reads version {FORMAT_VERSION}")
    if itemsize not in DTYPES:
        raise DataError(f"shard {path} is corrupt: token itemsize {itemsize}, expected 2 or 4")
    expected = HEADER_SIZE + num_tokens * itemsize
    if size != expected:
        problem = "truncated" if size < expected else "corrupt (trailing bytes)"
        raise DataError(
            f"shard {path} is {problem}: {size} bytes, but its header says {num_tokens} tokens x {itemsize} bytes "
            f"+ {HEADER_SIZE} = {expected}; re-run `distllm prepare`"
        )
    return ShardHeader(version=version, itemsize=itemsize, num_tokens=num_tokens, fingerprint=digest.hex())


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a shard's tokens (after checking its header); nothing is read until indexed."""
    header = read_header(path)
    if header.num_tokens == 0:
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.num_tokens,))


def verify_shard(
    path: str | os.PathLike,
    entry: dict,
    fingerprint: str,
    dtype: np.dtype,
    vocab_limit: int | None = None,
    check_hash: bool = True,
    block_size: int = 1 << 22,
) -> ShardHeader:
    """Check one shard against its manifest ``entry`` before its tokens are used; DataError naming the file.

    The header (magic, version, file size), the tokenizer ``fingerprint``, the token ``dtype`` and
    count against the manifest; then one pass over the file computes its sha256 (``check_hash``)
    and looks for a token id ``>= vocab_limit`` (reported with its offset in the shard).
    """
    path = Path(path)
    header = read_header(path)
    if header.fingerprint != fingerprint:
        raise DataError(
            f"shard {path} was made with another tokenizer (fingerprint {header.fingerprint[:12]} != "
            f"{fingerprint[:12]} in {MANIFEST}); re-run prepare"
        )
    if header.dtype != np.dtype(dtype):
        raise DataError(f"shard {path} holds {header.dtype.name} tokens, {MANIFEST} says {np.dtype(dtype).name}")
    if header.num_tokens != entry["num_tokens"]:
        raise DataError(
            f"shard {path} has {header.num_tokens} tokens, {MANIFEST} says {entry['num_tokens']}; re-run prepare"
        )
    if not check_hash and vocab_limit is None:
        return header
    digest = hashlib.sha256()
    bad_offset = bad_id = None  # first out-of-vocabulary token
    block_size -= block_size % header.itemsize
    with open(path, "rb") as f:
        digest.update(f.read(HEADER_SIZE))
        offset = 0  # tokens read so far
        while block := f.read(block_size):
            if check_hash:
                digest.update(block)
            if vocab_limit is not None and bad_offset is None:
                tokens = np.frombuffer(block, dtype=header.dtype)
                if tokens.size and int(tokens.max()) >= vocab_limit:
                    i = int(np.argmax(tokens >= vocab_limit))
                    bad_offset, bad_id = offset + i, int(tokens[i])
            offset += len(block) // header.itemsize
    if check_hash and digest.hexdigest() != entry["sha256"]:
        raise DataError(
            f"shard {path} is corrupt: its sha256 {digest.hexdigest()[:12]} differs from the {entry['sha256'][:12]} "
            f"recorded in {MANIFEST}; re-run `distllm prepare`"
        )
    if bad_offset is not None:
        raise DataError(
            f"shard {path} holds token id {bad_id} at token offset {bad_offset}, outside the vocabulary of "
            f"{vocab_limit} ids; it was made with another tokenizer or is corrupt (re-run `distllm prepare`), "
            "or model.vocab_size is too small"
        )
    return header


def data_fingerprint(manifest: dict, split: str) -> str:
    """Identity of a split's token stream: sha256 over its shards' recorded sha256s, in order."""
    digest = hashlib.sha256()
    for shard in manifest["splits"][split]["shards"]:
        digest.update(f"{shard['num_tokens']}:{shard['sha256']}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- manifest


def write_manifest(data_dir: str | os.PathLike, manifest: dict) -> Path:
    """Write ``data_dir/manifest.json`` atomically and durably (``write_durably``)."""
    path = Path(data_dir) / MANIFEST
    write_durably(path, json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """Load and sanity-check ``data_dir/manifest.json``; DataError if missing or malformed."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {data_dir} — run `distllm prepare CONFIG` first (data.dir)")
    return load_manifest(path)


def load_manifest(path: str | os.PathLike) -> dict:
    """Load and sanity-check a manifest file at ``path`` (a local copy of any data directory's)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no {path.name} in {path.parent} — run `distllm prepare CONFIG` first (data.dir)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run `distllm prepare`") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path} is malformed: expected a JSON object; re-run `distllm prepare`")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has format version {manifest.get('format_version')!r}; this distllm reads version "
            f"{FORMAT_VERSION}; re-run `distllm prepare`"
        )
    try:
        _check_keys(manifest, ("source", "tokenizer", "dtype", "splits"), path, "")
        _check_keys(manifest["tokenizer"], ("file", "fingerprint", "vocab_size", "eot_id"), path, "tokenizer.")
        for split in SPLITS:
            _check_keys(manifest["splits"], (split,), path, "splits.")
            _check_keys(manifest["splits"][split], ("num_tokens", "num_documents", "shards"), path, f"splits.{split}.")
            for shard in manifest["splits"][split]["shards"]:
                _check_keys(shard, ("file", "num_tokens", "sha256"), path, f"splits.{split}.shards[].")
        np.dtype(manifest["dtype"])
    except (TypeError, ValueError) as e:
        raise DataError(f"{path} is malformed ({e}); re-run `distllm prepare`") from None
    return manifest


def _check_keys(obj: dict, keys: tuple[str, ...], path: Path, prefix: str) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"{path} is malformed ({prefix.rstrip('.')} is not an object); re-run `distllm prepare`")
    missing = [prefix + k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{path} is malformed (missing {', '.join(missing)}); re-run `distllm prepare`")


def verify(data_dir: str | os.PathLike, check_hashes: bool = False) -> dict:
    """Check a prepared directory against its manifest; return the manifest.

    Every shard must exist with a valid header whose fingerprint equals the manifest's, which
    must equal the fingerprint of ``data_dir/tokenizer.json``; token counts must add up; with
    ``check_hashes`` every shard's sha256 is recomputed (reads everything). Each failure raises
    a DataError naming the file and the problem.
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    expected = manifest["tokenizer"]["fingerprint"]
    tok_path = data_dir / manifest["tokenizer"]["file"]
    actual = fingerprint(load_tokenizer(tok_path))
    if actual != expected:
        raise DataError(
            f"{tok_path} does not match the shards (fingerprint {actual[:12]} != {expected[:12]}); re-run prepare"
        )
    dtype = np.dtype(manifest["dtype"])
    for split in SPLITS:
        entry = manifest["splits"][split]
        total = 0
        for shard in entry["shards"]:
            path = data_dir / shard["file"]
            header = read_header(path)
            if header.fingerprint != expected:
                raise DataError(
                    f"shard {path} was made with another tokenizer (fingerprint {header.fingerprint[:12]} != "
                    f"{expected[:12]} in {MANIFEST}); re-run prepare"
                )
            if header.dtype != dtype:
                raise DataError(
                    f"shard {path} holds {header.dtype.name} tokens, {MANIFEST} says {dtype.name}; re-run prepare"
                )
            if header.num_tokens != shard["num_tokens"]:
                raise DataError(
                    f"shard {path} has {header.num_tokens} tokens, {MANIFEST} says {shard['num_tokens']}; "
                    "re-run prepare"
                )
            if check_hashes and sha256_file(path) != shard["sha256"]:
                raise DataError(
                    f"shard {path} has a different sha256 than {MANIFEST} records (changed or corrupt); re-run prepare"
                )
            total += header.num_tokens
        if total != entry["num_tokens"]:
            raise DataError(
                f"the {split} shards in {data_dir} hold {total} tokens, {MANIFEST} says {entry['num_tokens']}; "
                "re-run prepare"
            )
    return manifest
