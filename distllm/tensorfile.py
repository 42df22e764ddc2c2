"""safetensors files written in one pass: the bytes are hashed as they are written, then fsynced.

``write(path, tensors)`` lays out exactly what ``safetensors.torch.save_file`` writes (an 8-byte
little-endian header length, the JSON header padded with spaces to 8 bytes, then each tensor's raw
bytes in the header's order), so any safetensors reader reads it, and returns the file's size and
sha256 without reading it back. The file is created with mode 0666 minus the process umask (0644
under the usual 022), so a teammate on shared storage can read checkpoints and exports
(``safetensors``' own writer leaves 0600).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

CHUNK = 8 << 20  # bytes hashed and written at a time: stays in the CPU caches between the two
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors header (length prefix included) for ``tensors`` laid out in their order."""
    head: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        head[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
          after_first_chunk=None) -> tuple[int, str]:
    """Write ``tensors`` (CPU tensors; others are copied to the CPU) as a safetensors file and fsync it.

    Returns (size in bytes, sha256 hex digest) of the bytes written. ``after_first_chunk`` is called
    once the header is on its way (fault injection: a crash in the middle of a write)."""
    tensors = {k: _host(t) for k, t in tensors.items()}
    digest, size = hashlib.sha256(), 0
    fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        def put(buf) -> None:
            nonlocal size
            digest.update(buf)  # releases the GIL for large buffers, as os.write does
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view):]
            size += len(buf)

        put(header(tensors, metadata))
        if after_first_chunk is not None:
            after_first_chunk()
        for t in tensors.values():
            data = _bytes(t)
            for i in range(0, len(data), CHUNK):
                put(data[i : i + CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)
    return size, digest.hexdigest()


def _host(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


def _bytes(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_bytes(path: str | os.PathLike, data: bytes) -> tuple[int, str]:
    """Write ``data`` to ``path`` (mode 0666 minus the umask) and fsync it; (size, sha256)."""
    fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data), hashlib.sha256(data).hexdigest()
