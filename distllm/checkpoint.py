"""Checkpoints: a collective, atomic commit; discovery of the newest committed one; safe loading.

Layout of a run directory::

    RUN_DIR/checkpoints/step_000300/
        model.safetensors             one process: the fp32 weights by parameter name (whole tensors)
        model-rank00000.safetensors   ... several processes: each rank's own part, written by that rank
        model-rank00001.safetensors       alone (DDP: whole tensors of the parameters assigned to it, by
                                          name; ZeRO: its flat fp32 partitions "group0", "group1", ...)
        optimizer*.safetensors        AdamW's exp_avg / exp_avg_sq beside each model file ("<key>.exp_avg")
        rng-rank00000.json ...        torch / CUDA / numpy / python RNG states of every rank
        state.json                    step, tokens, data position, tokenizer fingerprint, resolved config
        tokenizer.json                the tokenizer the run trained with (for eval / generate / export)
        COMPLETE                      commit marker, written last: the manifest of every file's size and
                                      sha256, and the index ``params``: for each parameter name its shape
                                      and the pieces that hold it ({file, tensor, offset in that tensor,
                                      start in the flattened parameter, numel}); a moment's piece is in
                                      the file "optimizer..." beside "model..." under "<tensor>.exp_avg"

Nothing is gathered to save: under ZeRO each rank writes its own partition of the fp32 master
weights and of the moments as they lie in memory (read through ``deepspeed_fence``), under DDP the
ranks share the parameters out so that the writes run in parallel. Only the small reports of the
commit cross the network. Loading reads, through the index, only the byte ranges a rank needs
(safetensors slices): under ZeRO-3 its own partition, under ZeRO-1/2 the whole weights (the module
holds them whole) but only its partition of the moments, under DDP / one process everything. So a
checkpoint written by 2 ZeRO-3 ranks loads into 1 process, into DDP or into ZeRO-2 with no conversion
step, with the Adam moments restored exactly. Nothing is pickled: tensors go through safetensors,
everything else is JSON. Format 3; format-2 checkpoints (whole tensors, no index) are refused with
their version.

Commit protocol (``save``), run by every rank:

1. rank 0 creates the hidden ``.tmp-step_N`` directory; every rank writes its files into it, hashing
   each in the pass that writes it, and fsyncs them (``distllm.tensorfile``);
2. every rank reports (file sizes, checksums, its index pieces, or its error) to every rank: if any
   rank failed, all ranks raise the same CheckpointError (no rank waits forever), the temporary
   directory is removed and the previous checkpoint stays the newest committed one;
3. rank 0 checks that the pieces cover every parameter, renames the directory into place, then writes
   ``COMPLETE`` (atomically) and fsyncs;
4. only then are checkpoints beyond ``keep_last`` deleted, each one's marker first.

Asynchronous save (``Checkpointer`` with ``async_save``): step 1's state is first copied to host memory
(pinned on CUDA) at the step boundary, a background thread writes, hashes and fsyncs, and training goes
on; steps 2-4 run on the main thread at a later step boundary, once every rank's writes are durable
(agreed by one small all-reduce per step while a save is in flight: collectives never run from the
thread). At most one save is in flight.

A directory without ``COMPLETE``, or whose files do not match it, is never loaded.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from distllm import deepspeed_fence, faults, tensorfile
from distllm.durable import fsync_path, sha256_file, write_durably
from distllm.errors import CheckpointError

if TYPE_CHECKING:
    from distllm.distributed import Runtime

FORMAT_VERSION = 3
MARKER = "COMPLETE"
KINDS = ("weight", "exp_avg", "exp_avg_sq")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # names in a manifest: no separators, nothing hidden
_SHA256 = re.compile(r"[0-9a-f]{64}")  # a lowercase hex digest, as hashlib writes it


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_path(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:06d}"


# ---------------------------------------------------------------------------- discovery


def read_marker(path: Path) -> dict:
    """The commit manifest of a checkpoint; CheckpointError if it is not committed or not readable."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {path} is not committed (no {MARKER} marker); it cannot be trusted")
    try:
        text = marker.read_text()
        manifest = {"format_version": 1} if text.strip() == "ok" else json.loads(text)  # 1: distllm 0.1
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable {MARKER} marker ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this distllm reads version {FORMAT_VERSION}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"checkpoint {path}: {MARKER} lists no files")
    for name, entry in files.items():
        if not _FILE_NAME.match(name) or name in (".", ".."):
            raise CheckpointError(f"checkpoint {path}: {MARKER} names {name!r}, which is not a plain file name")
        if not (isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            raise CheckpointError(f"checkpoint {path}: {MARKER} entry for {name} is not a size and a sha256 ({entry!r:.80})")
    if not isinstance(manifest.get("params"), dict):
        raise CheckpointError(f"checkpoint {path}: {MARKER} has no index of parameters")
    return manifest


def is_committed(path: Path) -> bool:
    try:
        read_marker(path)
        return True
    except CheckpointError:
        return False


def step_of(path: Path) -> int | None:
    """The step of a ``step_N`` checkpoint directory (None for any other name)."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def unverified_reason(path: Path) -> str | None:
    """Why a committed-looking checkpoint cannot be trusted (None: it verifies): its marker does not parse,
    or a file it lists is missing or has another size. Checksums are checked when it is loaded."""
    try:
        check_files(path, read_marker(path), verify=False)
    except CheckpointError as e:
        return str(e)
    return None


def scan(run_dir: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(checkpoints that verify, oldest first; ``step_N`` directories with a marker that do not, with why).
    Directories without a marker are saves that never committed: neither list (``remove_leftovers``)."""
    root = checkpoint_dir(run_dir)
    good, bad = [], []
    for p in sorted(root.iterdir(), key=lambda p: step_of(p) or 0) if root.is_dir() else []:
        if step_of(p) is None or not p.is_dir() or not (p / MARKER).exists():
            continue
        why = unverified_reason(p)
        (good.append(p) if why is None else bad.append((p, why)))
    return good, bad


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Committed checkpoints of a run that verify (``unverified_reason``), oldest first: what resume picks
    from and what retention (``keep_last``) counts and deletes."""
    return scan(run_dir)[0]


def set_aside_unverified(run_dir: str | os.PathLike) -> list[tuple[Path, Path, str]]:
    """Rename every checkpoint that does not verify to ``corrupt-step_N`` (rank 0, before training): kept
    for inspection, never loaded, never counted or deleted by retention (it takes disk space until the user
    deletes it), and a later save of the same step cannot overwrite it. Returns (old, new, why)."""
    moved = []
    for path, why in scan(run_dir)[1]:
        new, n = path.with_name(f"corrupt-{path.name}"), 1
        while new.exists():
            new, n = path.with_name(f"corrupt-{path.name}.{n}"), n + 1
        path.rename(new)
        moved.append((path, new, why))
    return moved


def latest(run_dir: str | os.PathLike) -> Path | None:
    ckpts = complete_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve(spec: str | None, run_dir: str | os.PathLike) -> Path | None:
    """``checkpoint.resume_from`` -> a committed checkpoint or None.

    ``None`` -> None; ``latest`` -> the newest committed checkpoint of the run (or None); ``step_N``
    -> that checkpoint of the run; else a path to a checkpoint directory.
    """
    if spec is None:
        return None
    if spec == "latest":
        return latest(run_dir)
    if ".." in Path(spec).parts:
        raise CheckpointError(f"checkpoint {spec!r} contains '..'; give the checkpoint's absolute path instead")
    path = checkpoint_dir(run_dir) / spec if _STEP_DIR.match(spec) else Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    read_marker(path)
    return path


def locate(target: str | os.PathLike) -> Path:
    """A run directory -> its newest committed checkpoint; a checkpoint directory -> itself."""
    path = Path(target)
    if ".." in path.parts:
        raise CheckpointError(f"{target!r} contains '..'; give an absolute path instead")
    if (path / MARKER).exists() or _STEP_DIR.match(path.name):
        read_marker(path)
        return path
    if not path.is_dir():
        raise CheckpointError(f"no committed checkpoint: no run or checkpoint directory at {path}; train first")
    found = latest(path)
    if found is None:
        raise CheckpointError(f"no committed checkpoint in {checkpoint_dir(path)}; train first or name a checkpoint")
    return found


def read_state(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable state.json: {e}") from None


# ---------------------------------------------------------------------------- reading tensors through the index


class TensorReader:
    """The tensors of a committed checkpoint by parameter name, read through the index of its manifest:
    ``read(name, kind, start, stop)`` reads only the byte ranges of the pieces that hold elements
    [start, stop) of the flattened parameter; ``get(name)`` a whole tensor in its shape."""

    def __init__(self, path: Path, manifest: dict | None = None):
        self.path = Path(path)
        self.manifest = read_marker(self.path) if manifest is None else manifest
        self.params: dict[str, dict] = self.manifest["params"]
        self.adam_step = int(self.manifest.get("adam_step", 0))
        self._handles: dict[str, object] = {}

    def keys(self) -> set[str]:
        return set(self.params)

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.params[name]["shape"])

    def numel(self, name: str) -> int:
        return int(np.prod(self.shape(name), dtype=np.int64))

    def files(self, name: str, kind: str = "weight", start: int = 0, stop: int | None = None) -> set[str]:
        """The files that ``read`` with the same arguments opens."""
        return {file for file, *_ in self._pieces(name, kind, start, stop)}

    def read(self, name: str, kind: str = "weight", start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened parameter ``name`` (``kind``: weight, exp_avg, exp_avg_sq).

        Copy it into memory of your own before keeping it: a whole fp32 piece comes as safetensors gives it, a
        view of the file's private memory map, which would keep the file's pages (and, once retention deletes
        the checkpoint, its disk space) for as long as the tensor lives."""
        stop = self.numel(name) if stop is None else stop
        parts = [(lo, hi, _flat_range(self._slice(file, tensor), at, at + hi - lo))
                 for file, tensor, at, lo, hi in self._pieces(name, kind, start, stop)]
        if sum(hi - lo for lo, hi, _ in parts) != stop - start:
            raise CheckpointError(f"checkpoint {self.path}: its pieces of {name} ({kind}) do not cover "
                                  f"elements {start}..{stop}")
        if len(parts) == 1:
            return parts[0][2].to(torch.float32)  # one piece: no second copy
        out = torch.empty(stop - start, dtype=torch.float32)
        for lo, hi, part in parts:
            out[lo - start : hi - start] = part
        return out

    def get(self, name: str, kind: str = "weight") -> torch.Tensor:
        if name not in self.params:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {name!r}")
        return self.read(name, kind).view(self.shape(name))

    def _pieces(self, name: str, kind: str, start: int, stop: int | None):
        """(file, tensor key, offset in that tensor, lo, hi) of every piece holding elements [lo, hi) of
        [start, stop)."""
        stop = self.numel(name) if stop is None else stop
        for piece in self.params[name]["pieces"]:
            lo, hi = max(start, piece["start"]), min(stop, piece["start"] + piece["numel"])
            if lo >= hi:
                continue
            file, tensor = piece["file"], piece["tensor"]
            if kind != "weight":
                file, tensor = "optimizer" + file.removeprefix("model"), f"{tensor}.{kind}"
            if file not in self.manifest["files"]:
                raise CheckpointError(f"checkpoint {self.path}: its index names {file!r}, which {MARKER} does not list")
            yield file, tensor, piece["offset"] + lo - piece["start"], lo, hi

    def _slice(self, file: str, tensor: str):
        from safetensors import safe_open

        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="pt")
            except Exception as e:  # safetensors raises its own types for a corrupt header
                raise CheckpointError(f"cannot read {self.path / file}: {_first_line(e)}") from None
        try:
            return self._handles[file].get_slice(tensor)
        except Exception as e:
            raise CheckpointError(f"cannot read {tensor} from {self.path / file}: {_first_line(e)}") from None


def _flat_range(sl, a: int, b: int) -> torch.Tensor:
    """Elements [a, b) of a safetensors slice's flattened tensor, reading whole rows only."""
    shape = sl.get_shape()
    if len(shape) <= 1:
        return sl[a:b]
    row = int(np.prod(shape[1:], dtype=np.int64))
    r0, r1 = a // row, -(-b // row)
    return sl[r0:r1].reshape(-1)[a - r0 * row : b - r0 * row]


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into a single-device model (eval, generate), strictly."""
    copy_weights(model, TensorReader(path), path)


def check_names(path: Path, model_names: set[str], saved_names: set[str]) -> None:
    """The checkpoint holds a tensor for every parameter of the model and nothing else."""
    missing, unexpected = sorted(model_names - saved_names), sorted(saved_names - model_names)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "check the model section of the config"
        )


def check_shape(path: Path, name: str, saved: tuple, model: tuple) -> None:
    if tuple(saved) != tuple(model):
        raise CheckpointError(
            f"cannot load weights from {path}: size mismatch for {name}: the checkpoint has "
            f"{tuple(saved)}, the model {tuple(model)}; check the model section of the config"
        )


def copy_weights(model: torch.nn.Module, reader: TensorReader, path: Path) -> None:
    params = dict(model.named_parameters())
    check_names(path, set(params), reader.keys())
    with torch.no_grad():
        for name, p in params.items():
            check_shape(path, name, reader.shape(name), p.shape)
            p.copy_(reader.get(name))


# ---------------------------------------------------------------------------- what each rank writes


def _named_params(rt: "Runtime", model) -> list[tuple[str, torch.nn.Parameter]]:
    return list(rt.unwrap(model).named_parameters())  # shared (tied) tensors once, in a fixed order


def ddp_writers(numels: list[int], world_size: int) -> list[int]:
    """The rank that writes each parameter when every rank holds them all (DDP): the largest first,
    each to the rank with the fewest bytes so far, so that the ranks write about as much in parallel."""
    load, owner = [0] * world_size, [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[i], load[rank] = rank, load[rank] + numels[i]
    return owner


@dataclass
class Shard:
    """What one rank writes into a checkpoint: safetensors files (host tensors by key), small files
    (bytes), and its pieces of the index (parameter name -> pieces)."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    texts: dict[str, bytes] = field(default_factory=dict)
    pieces: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.tensors.values() for t in ts.values())


def own_shard(rt: "Runtime", model, optimizer, buffers: dict | None = None) -> tuple[Shard, int]:
    """(this rank's part of the checkpoint, AdamW's step count). Local: no collective, nothing gathered.

    ``buffers``: snapshot the tensors into these host buffers (pinned on CUDA; kept by the caller and reused
    by the next snapshot, so that it costs a copy, not an allocation) so that training may go on while they
    are written; None: CPU tensors are written in place (the caller blocks until they are)."""
    params = _named_params(rt, model)
    shard = Shard()
    name_of = f"model-rank{rt.rank:05d}.safetensors" if rt.world_size > 1 or rt.deepspeed else "model.safetensors"
    opt_name = "optimizer" + name_of.removeprefix("model")
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    if not rt.deepspeed:
        owners = ddp_writers([p.numel() for _, p in params], rt.world_size)
        states = [optimizer.state.get(p, {}) for _, p in params]
        adam_step = next((int(st["step"]) for st in states if "step" in st), 0)
        for (name, p), owner, st in zip(params, owners, states):
            if owner != rt.rank:
                continue
            weights[name] = _host(p.detach().to(torch.float32), buffers, name)
            if adam_step:
                for kind in KINDS[1:]:
                    key = f"{name}.{kind}"
                    moments[key] = _host(st[kind].detach(), buffers, key) if kind in st else torch.zeros_like(
                        weights[name])
            shard.pieces[name] = [{"file": name_of, "tensor": name, "offset": 0, "start": 0, "numel": p.numel()}]
    else:
        adam_step = deepspeed_fence.adam_step(model)
        flats = deepspeed_fence.flat_partitions(model)
        for g, flat in enumerate(flats):
            weights[f"group{g}"] = _host(flat.detach(), buffers, f"group{g}")
            if adam_step:
                for kind, t in zip(KINDS[1:], deepspeed_fence.partition_moments(model, g)):
                    moments[f"group{g}.{kind}"] = _host(t.detach(), buffers, f"group{g}.{kind}")
        local = deepspeed_fence.local_pieces(model, [p for _, p in params])
        for (name, _), pieces in zip(params, local):
            if pieces:
                shard.pieces[name] = [{"file": name_of, "tensor": f"group{g}", "offset": off, "start": start,
                                       "numel": n} for g, off, start, n in pieces]
    if rt.device.type == "cuda":
        torch.cuda.synchronize()  # the non-blocking copies into pinned memory are done
    if weights:
        shard.tensors[name_of], shard.metadata[name_of] = weights, {"format": "pt"}
    if moments:
        shard.tensors[opt_name] = moments
        shard.metadata[opt_name] = {"format": "pt", "adam_step": str(adam_step)}
    return shard, adam_step


def _host(t: torch.Tensor, buffers: dict | None, key: str) -> torch.Tensor:
    """``t`` in host memory: itself (a CPU tensor written in place), else a copy into ``buffers[key]``."""
    if buffers is None and t.device.type == "cpu":
        return t.contiguous()
    buffers = {} if buffers is None else buffers
    buf = buffers.get(key)
    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
        buf = buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
    return buf.copy_(t, non_blocking=t.device.type == "cuda")


# ---------------------------------------------------------------------------- save (collective)


@dataclass
class PendingSave:
    """One checkpoint on its way: ``begin`` (collective) -> ``write`` (this rank's files; local, may run on
    a background thread) -> ``commit`` (collective)."""

    rt: "Runtime"
    run_dir: Path
    step: int
    tmp: Path
    final: Path
    shard: Shard
    adam_step: int
    shapes: dict[str, list[int]]
    tokenizer_file: Path | None
    files: dict[str, dict] = field(default_factory=dict)
    error: str | None = None
    write_seconds: float = 0.0

    def write(self) -> None:
        """Write, hash and fsync this rank's files into the temporary directory; never raises (the error is
        kept for ``commit`` to report)."""
        t0 = time.monotonic()
        try:
            if not self.tmp.is_dir():
                raise CheckpointError(f"{self.tmp} is not visible on rank {self.rt.rank}: run.dir must be on a "
                                      "filesystem that every node shares")
            jobs = list(self.shard.tensors.items())
            with ThreadPoolExecutor(max_workers=max(1, min(4, len(jobs)))) as pool:  # files in parallel
                done = pool.map(lambda job: (job[0], tensorfile.write(self.tmp / job[0], job[1],
                                                                       self.shard.metadata.get(job[0]))), jobs)
                for i, (name, (size, sha)) in enumerate(done):
                    self.files[name] = {"size": size, "sha256": sha}
                    if i == 0:
                        faults.trigger("save", rank=self.rt.rank, step=self.step)
            if not jobs:
                faults.trigger("save", rank=self.rt.rank, step=self.step)
            texts = dict(self.shard.texts)
            if self.tokenizer_file is not None:
                texts["tokenizer.json"] = Path(self.tokenizer_file).read_bytes()
            for name, data in texts.items():
                size, sha = tensorfile.write_bytes(self.tmp / name, data)
                self.files[name] = {"size": size, "sha256": sha}
        except Exception as e:  # a full disk comes as OSError, RuntimeError or SafetensorError
            self.error = _describe(e)
        self.shard = Shard(pieces=self.shard.pieces)  # the snapshot is written: free it
        self.write_seconds = time.monotonic() - t0

    def commit(self, keep_last: int) -> Path:
        """Every rank: exchange the reports; rank 0 commits. CheckpointError (the same on every rank) if any
        rank failed."""
        rt, final = self.rt, self.final
        reports = rt.gather_object((self.files, self.shard.pieces, self.error))  # every rank reaches this
        failed = [(r, err) for r, (_, _, err) in enumerate(reports) if err]
        if failed:
            if rt.is_main:
                shutil.rmtree(self.tmp, ignore_errors=True)
            rank, err = failed[0]
            where = f" on rank {rank}" if rt.world_size > 1 else ""
            raise CheckpointError(f"could not write checkpoint {final}{where}: {err}{_intact(self.run_dir)}")
        error = None
        if rt.is_main:
            try:
                manifest = {"format_version": FORMAT_VERSION, "step": self.step, "world_size": rt.world_size,
                            "engine": rt.engine_name, "adam_step": self.adam_step, "files": {},
                            "params": {n: {"shape": s, "pieces": []} for n, s in self.shapes.items()}}
                for files, pieces, _ in reports:
                    manifest["files"].update(files)
                    for name, own in pieces.items():
                        manifest["params"][name]["pieces"].extend(own)
                check_index(manifest)
                root = self.tmp.parent
                fsync_path(self.tmp)
                if final.exists():  # an uncommitted leftover of a crashed save of this step
                    shutil.rmtree(final)
                self.tmp.rename(final)
                write_durably(final / MARKER, json.dumps(manifest, indent=1) + "\n")
                fsync_path(final)
                fsync_path(root)
                for old in complete_checkpoints(self.run_dir)[:-keep_last]:
                    _retire(old, root / f".old-{old.name}")
            except Exception as e:
                error = _describe(e)
        error = rt.broadcast_object(error)
        if error:
            raise CheckpointError(f"could not commit checkpoint {final}: {error}{_intact(self.run_dir)}")
        return final


def check_index(manifest: dict) -> None:
    """Every parameter's pieces cover its elements exactly once (a save that missed a piece is not committed)."""
    for name, entry in manifest["params"].items():
        numel = int(np.prod(entry["shape"], dtype=np.int64))
        pieces = sorted(entry["pieces"], key=lambda p: p["start"])
        entry["pieces"] = pieces
        at = 0
        for p in pieces:
            if p["start"] != at or p["numel"] <= 0:
                break
            at += p["numel"]
        if at != numel:
            raise CheckpointError(f"the pieces written of {name} do not cover its {numel} elements exactly")


def begin(rt: "Runtime", run_dir: str | os.PathLike, step: int, model, optimizer, state: dict,
          tokenizer_file: Path | None = None, buffers: dict | None = None) -> PendingSave | None:
    """Collective: prepare checkpoint ``step`` (the temporary directory, this rank's snapshot); None when
    that step is already committed (the same state: a good checkpoint is never replaced)."""
    root, final = checkpoint_dir(run_dir), step_path(run_dir, step)
    tmp = root / f".tmp-{final.name}"
    if rt.broadcast_object(is_committed(final) if rt.is_main else None):
        return None
    error = None
    if rt.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = _describe(e)
    error = rt.broadcast_object(error)
    if error:
        raise CheckpointError(f"could not write checkpoint {final}: {error}{_intact(run_dir)}")
    shard, adam_step = own_shard(rt, model, optimizer, buffers)
    shard.texts[f"rng-rank{rt.rank:05d}.json"] = json.dumps(rng_state()).encode()
    if rt.is_main:
        shard.texts["state.json"] = json.dumps({"step": step, **state}, indent=2).encode()
    shapes = {name: list(deepspeed_fence.full_shape(p)) for name, p in _named_params(rt, model)}
    return PendingSave(rt, Path(run_dir), step, tmp, final, shard, adam_step, shapes,
                       tokenizer_file if rt.is_main else None)


def save(rt: "Runtime", run_dir: str | os.PathLike, step: int, model, optimizer, state: dict, keep_last: int,
         tokenizer_file: Path | None = None) -> Path:
    """Write checkpoint ``step`` with the commit protocol of the module docstring, synchronously. Every
    rank calls it."""
    pending = begin(rt, run_dir, step, model, optimizer, state, tokenizer_file)
    if pending is None:
        return step_path(run_dir, step)
    pending.write()
    return pending.commit(keep_last)


def remove_leftovers(run_dir: str | os.PathLike) -> list[Path]:
    """Delete ``.tmp-*`` / ``.old-*`` directories of saves that crashed (call on rank 0 before training)."""
    root = checkpoint_dir(run_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        for p in root.iterdir():  # uncommitted step directories (a crash between rename and marker)
            if _STEP_DIR.match(p.name) and p.is_dir() and not (p / MARKER).exists():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _retire(path: Path, trash: Path) -> None:
    """Delete a checkpoint so that it is never half-trusted: marker first, then the files."""
    (path / MARKER).unlink(missing_ok=True)
    fsync_path(path)
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _intact(run_dir) -> str:
    previous = latest(run_dir)
    return f"; the previous checkpoint {previous} is intact" if previous else "; no earlier checkpoint exists"


def _describe(e: BaseException) -> str:
    text = str(e)
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text or "ENOSPC" in text:
        return "no space left on device"
    if isinstance(e, PermissionError) or getattr(e, "errno", None) in (errno.EACCES, errno.EROFS):
        return f"permission denied ({_first_line(e)})"
    if isinstance(e, CheckpointError):
        return str(e)
    return f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


# ---------------------------------------------------------------------------- load (collective)


def load(rt: "Runtime", path: Path, model, optimizer, verify: bool = True, weights_only: bool = False) -> dict:
    """Restore weights, optimizer moments and this rank's RNG from a committed checkpoint; return its state.
    ``weights_only``: the weights alone (e.g. SFT's ``sft.init_from``): the optimizer and the RNGs stay fresh.

    Works for any number of processes and any engine (see the module docstring). Each rank checks and
    reads only the files that hold what it needs. Every rank calls it."""
    manifest = read_marker(path)
    reader = TensorReader(path, manifest)
    if weights_only:
        reader.adam_step = 0  # no moments are read, the optimizer's step count stays 0
    params = _named_params(rt, model)
    check_names(path, {n for n, _ in params}, reader.keys())
    for name, p in params:
        check_shape(path, name, reader.shape(name), deepspeed_fence.full_shape(p))  # ZeRO-3: the real shape
    reads, finish = restore_plan(rt, model, optimizer, params, reader)
    rng_name = f"rng-rank{rt.rank:05d}.json"
    own_rng = rng_name in manifest["files"] and manifest.get("world_size") == rt.world_size and not weights_only
    needed = {"state.json", *([rng_name] if own_rng else [])}
    for name, kind, start, stop, _ in reads:
        needed |= reader.files(name, kind, start, stop)
    check_files(path, manifest, verify=verify, names=needed)
    with torch.no_grad():
        for name, kind, start, stop, sink in reads:
            sink(reader.read(name, kind, start, stop))
        finish()
    if own_rng:
        set_rng_state(json.loads((path / rng_name).read_text()))
    return read_state(path)


Read = tuple[str, str, int, int, Callable[[torch.Tensor], None]]


def restore_plan(rt: "Runtime", model, optimizer, params, reader: TensorReader) -> tuple[list[Read], Callable]:
    """What this rank reads -- (parameter, kind, start, stop, where the elements go) -- and what to run
    after (the optimizer's step count). DDP / one process: whole tensors; ZeRO-1/2: whole weights (the
    module holds them whole) and this rank's partition of the fp32 master and the moments; ZeRO-3: this
    rank's partition only (a small persistent parameter, held whole, whole)."""
    adam_step = reader.adam_step
    reads: list[Read] = []
    if not rt.deepspeed:
        moments: dict[tuple[str, str], torch.Tensor] = {}
        for name, p in params:
            reads.append((name, "weight", 0, p.numel(), lambda t, p=p: p.copy_(t.view(p.shape))))
            for kind in KINDS[1:] if adam_step else ():  # a copy: ``read`` may return a view of the file's mapping
                reads.append((name, kind, 0, p.numel(), lambda t, key=(name, kind), p=p: moments.__setitem__(
                    key, t.view(p.shape).to(p.device, copy=True))))

        def finish() -> None:
            if not adam_step:
                return
            sd = optimizer.state_dict()
            index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
            sd["state"] = {index[id(p)]: {"step": torch.tensor(float(adam_step)),
                                          "exp_avg": moments[(n, "exp_avg")],
                                          "exp_avg_sq": moments[(n, "exp_avg_sq")]} for n, p in params}
            optimizer.load_state_dict(sd)

        return reads, finish

    flats = deepspeed_fence.flat_partitions(model)
    local = deepspeed_fence.local_pieces(model, [p for _, p in params])
    for (name, p), pieces in zip(params, local):
        zero3 = hasattr(p, "ds_tensor")
        if zero3:
            working, whole = deepspeed_fence.working_partition(p)
        if not zero3 or whole:  # the module's copy of this parameter is whole on this rank
            reads.append((name, "weight", 0, reader.numel(name), lambda t, p=p: p.data.copy_(t.view(p.data.shape))))
        for g, off, start, n in pieces:
            def put(t, dst=flats[g].narrow(0, off, n)):
                dst.copy_(t)

            reads.append((name, "weight", start, start + n, put))
            if zero3:  # the working partition (the same memory as the fp32 one under fp32)
                reads.append((name, "weight", start, start + n,
                              lambda t, dst=working.narrow(0, 0, n): dst.copy_(t)))
            for kind, state in zip(KINDS[1:], deepspeed_fence.partition_moments(model, g)) if adam_step else ():
                reads.append((name, kind, start, start + n, lambda t, dst=state.narrow(0, off, n): dst.copy_(t)))

    def finish() -> None:
        if adam_step:
            deepspeed_fence.set_adam_step(model, adam_step)

    return reads, finish


def check_files(path: Path, manifest: dict, verify: bool = True, names: set[str] | None = None) -> None:
    """Every file of the manifest is there with its size; with ``verify``, the sha256 of each file of
    ``names`` (default: all) matches, checked in parallel threads."""
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if f.stat().st_size != meta["size"]:
            raise CheckpointError(f"checkpoint file {f} has {f.stat().st_size} bytes, {MARKER} says {meta['size']}")
    if not verify:
        return
    todo = sorted(set(manifest["files"]) if names is None else names & set(manifest["files"]))
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(todo)))) as pool:
        for name, digest in zip(todo, pool.map(lambda n: sha256_file(path / n), todo)):
            if digest != manifest["files"][name]["sha256"]:
                raise CheckpointError(
                    f"checkpoint file {path / name} does not match its sha256 in {MARKER} (corrupt or changed)")


# ---------------------------------------------------------------------------- RNG, files


def rng_state() -> dict:
    """Every RNG of this process as JSON-safe values."""
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": b64(torch.get_rng_state()),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])


# ---------------------------------------------------------------------------- the training loop's checkpointer


def async_default(setting, device_type: str) -> bool:
    """``checkpoint.async_save``: true / false, or ``auto`` = on for CUDA (the copy to pinned host memory is
    fast and the GPU keeps training), off on the CPU (the snapshot would compete with training for memory
    bandwidth and the same cores)."""
    return device_type == "cuda" if setting == "auto" else bool(setting)


class Checkpointer:
    """What the training loop saves through, every rank alike: ``save`` at a step boundary, ``poll`` at each
    step boundary (commits an asynchronous save once every rank's writes are durable, or raises its
    error), ``wait`` before exiting (finishes the pending save). ``seconds``: how long the last save
    blocked the loop (the time-limit margin)."""

    def __init__(self, rt: "Runtime", run_dir: str | os.PathLike, keep_last: int, tokenizer_file: Path | None,
                 async_save: bool = False, report: Callable[[str], None] | None = None,
                 on_commit: Callable[[Path], None] | None = None):
        self.rt, self.run_dir, self.keep_last, self.tokenizer_file = rt, Path(run_dir), keep_last, tokenizer_file
        self.async_save, self.report = async_save, report or (lambda text: None)
        self.on_commit = on_commit or (lambda path: None)  # e.g. the upload to object storage
        self.seconds = 0.0  # how long the last save blocked the loop
        self.exit_seconds = 0.0  # how long the last save took from its start to its commit: a save before exiting
        self.last_time = time.monotonic()
        self.last_path: Path | None = None
        self._pending: PendingSave | None = None
        self._thread: threading.Thread | None = None
        self._buffers: dict[str, torch.Tensor] = {}  # the host snapshot, reused by every asynchronous save

    def save(self, step: int, model, optimizer, state: dict) -> Path:
        """Start checkpoint ``step`` (after the previous one is committed: at most one in flight); synchronous
        unless ``async_save``. Returns the checkpoint's path (committed by ``poll`` / ``wait`` when async)."""
        t0 = time.monotonic()
        self.wait()
        pending = begin(self.rt, self.run_dir, step, model, optimizer, state, self.tokenizer_file,
                        buffers=self._buffers if self.async_save else None)
        if pending is None:  # already committed: nothing was saved
            self.last_path = step_path(self.run_dir, step)
            self.report(f"checkpoint {self.last_path} is already committed; not saved again")
            self.on_commit(self.last_path)
        elif self.async_save:
            self._pending = pending
            self._thread = threading.Thread(target=pending.write, name=f"checkpoint-{step}", daemon=True)
            self._thread.start()
        else:
            pending.write()
            self._commit(pending, t0)
        self.last_time = time.monotonic()
        self.seconds = self.last_time - t0
        if pending is not None and self.async_save:
            self.report(f"saving checkpoint {pending.final} in the background (blocked {self.seconds:.1f} s)")
        return step_path(self.run_dir, step)

    def poll(self) -> None:
        """At a step boundary (every rank): commit the save in flight if every rank's writes are done; raise
        its CheckpointError if one failed. One small all-reduce while a save is in flight."""
        if self._pending is None:
            return
        (busy,) = self.rt.any(self._thread.is_alive())
        if not busy:
            self.wait()

    def wait(self) -> Path | None:
        """Finish the pending save, if any (every rank); the newest checkpoint this run saved."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            t0 = time.monotonic()
            self._thread.join()
            self._commit(pending, t0)
        return self.last_path

    def _commit(self, pending: PendingSave, t0: float) -> None:
        self.last_path = pending.commit(self.keep_last)
        waited = time.monotonic() - t0  # sync: the whole save; async: joining the writer and committing
        # what the same save would take before an exit: async, the snapshot the loop waited for (``seconds``,
        # still this save's) + the background write + the commit; sync, the whole save, counted once
        self.exit_seconds = self.seconds + pending.write_seconds + waited if self.async_save else waited
        self.on_commit(self.last_path)
        if self.async_save:
            self.report(f"saved checkpoint {self.last_path} (written in {pending.write_seconds:.1f} s in the "
                        f"background; committing blocked {waited:.1f} s)")
        else:
            self.report(f"saved checkpoint {self.last_path} ({waited:.1f} s)")
