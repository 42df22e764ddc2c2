"""Checkpoints: a collective, atomic commit; discovery of the newest committed one; safe loading.

Layout of a run directory::

    RUN_DIR/checkpoints/step_000300/
        model.safetensors             full fp32 weights by parameter name (one process or DDP), or
        model-rank00000.safetensors   ... one file per rank under ZeRO: each rank writes the whole
        model-rank00001.safetensors       tensors of the parameters it owns (parameter i -> rank i % N)
        optimizer*.safetensors        AdamW moments "<name>.exp_avg" / "<name>.exp_avg_sq", same sharding
        rng-rank00000.json ...        torch / CUDA / numpy / python RNG states of every rank
        state.json                    step, tokens, data position, tokenizer fingerprint, resolved config
        tokenizer.json                the tokenizer the run trained with (for eval / generate / export)
        COMPLETE                      commit marker: a manifest of every file's size and sha256, written last

The format does not depend on the number of processes or the engine: a checkpoint written by 2
ZeRO-3 ranks loads into 1 process, into DDP or into ZeRO-2 with no conversion step, with the
Adam moments restored exactly (``load_training_state`` maps them by parameter name).
Nothing is pickled: tensors go through safetensors, everything else is JSON.

Commit protocol (``save``), run by every rank:

1. rank 0 creates the hidden ``.tmp-step_N`` directory; every rank writes its files into it and
   fsyncs them;
2. every rank reports (file sizes, checksums, or its error) to every rank: if any rank failed, all
   ranks raise the same CheckpointError (no rank waits forever), the temporary directory is removed
   and the previous checkpoint stays the newest committed one;
3. rank 0 renames the directory into place, then writes ``COMPLETE`` (atomically) and fsyncs;
4. only then are checkpoints beyond ``keep_last`` deleted, each one's marker first.

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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from distllm import deepspeed_fence, faults
from distllm.durable import fsync_path, sha256_file, write_durably
from distllm.errors import CheckpointError

if TYPE_CHECKING:
    from distllm.distributed import Runtime

FORMAT_VERSION = 2
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # names in a manifest: no separators, nothing hidden


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
    for name in files:
        if not _FILE_NAME.match(name) or name in (".", ".."):
            raise CheckpointError(f"checkpoint {path}: {MARKER} names {name!r}, which is not a plain file name")
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


# ---------------------------------------------------------------------------- tensors


class TensorReader:
    """Lazy access by key to the tensors of a checkpoint's ``<prefix>*.safetensors`` files."""

    def __init__(self, path: Path, prefix: str, files: list[str]):
        from safetensors import safe_open

        self.path, self._where = Path(path), {}
        self._handles = []
        for name in sorted(f for f in files if f.startswith(prefix) and f.endswith(".safetensors")):
            try:
                handle = safe_open(str(self.path / name), framework="pt")
            except Exception as e:  # safetensors raises its own types for a corrupt header
                raise CheckpointError(f"cannot read {self.path / name}: {_first_line(e)}") from None
            self._handles.append(handle)
            for key in handle.keys():
                self._where[key] = handle
            self.metadata = handle.metadata() or {}

    def keys(self) -> set[str]:
        return set(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {key!r}")
        return self._where[key].get_tensor(key)


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into a single-device model (eval, generate), strictly."""
    manifest = read_marker(path)
    reader = TensorReader(path, "model", list(manifest["files"]))
    copy_weights(model, reader, path)


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
            t = reader.get(name)
            check_shape(path, name, t.shape, p.shape)
            p.copy_(t)


# ---------------------------------------------------------------------------- engine state <-> tensors by name


def _named_params(rt: "Runtime", model) -> list[tuple[str, torch.nn.Parameter]]:
    return list(rt.unwrap(model).named_parameters())  # shared (tied) tensors once, in a fixed order


def owned_state(rt: "Runtime", model, optimizer) -> tuple[dict, dict, int]:
    """(weights, AdamW moments, Adam step count) that this rank writes into a checkpoint: whole fp32
    tensors by parameter name. DDP / one process: rank 0 writes everything. ZeRO: the shards are
    gathered parameter by parameter (a collective) and parameter i is written by rank i % N."""
    params = _named_params(rt, model)
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    if not rt.deepspeed:
        step = 0
        if rt.is_main:
            for name, p in params:
                weights[name] = p.detach().to("cpu", torch.float32).contiguous()
                st = optimizer.state.get(p, {})
                if "exp_avg" in st:
                    moments[f"{name}.exp_avg"] = st["exp_avg"].detach().to("cpu").contiguous()
                    moments[f"{name}.exp_avg_sq"] = st["exp_avg_sq"].detach().to("cpu").contiguous()
                    step = int(st["step"])
        return weights, moments, step
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    step = deepspeed_fence.adam_step(model)
    (has_state,) = rt.any(step > 0)  # every rank takes the same branch: the gathers are collectives
    for i, (name, p) in enumerate(params):
        full = safe_get_full_fp32_param(p)
        m = safe_get_full_optimizer_state(p, "exp_avg") if has_state else None
        v = safe_get_full_optimizer_state(p, "exp_avg_sq") if has_state else None
        if i % rt.world_size == rt.rank:
            shape = deepspeed_fence.full_shape(p)
            weights[name] = full.detach().to("cpu").reshape(shape).contiguous()
            if has_state:
                moments[f"{name}.exp_avg"] = m.detach().to("cpu").reshape(shape).contiguous()
                moments[f"{name}.exp_avg_sq"] = v.detach().to("cpu").reshape(shape).contiguous()
    return weights, moments, step


def load_training_state(rt: "Runtime", model, optimizer, weights: "TensorReader", moments: "TensorReader",
                        adam_step: int, path: Path) -> None:
    """Set weights and AdamW state from a checkpoint's TensorReaders (any engine, any number of ranks)."""
    params = _named_params(rt, model)
    check_names(path, {n for n, _ in params}, weights.keys())
    has_moments = bool(moments.keys())
    if not rt.deepspeed:
        copy_weights(rt.unwrap(model), weights, path)
        if has_moments:
            sd = optimizer.state_dict()
            index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
            sd["state"] = {
                index[id(p)]: {"step": torch.tensor(float(adam_step)),
                               "exp_avg": moments.get(f"{n}.exp_avg"),
                               "exp_avg_sq": moments.get(f"{n}.exp_avg_sq")}
                for n, p in params
            }
            optimizer.load_state_dict(sd)
        return
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if has_moments:
        deepspeed_fence.set_adam_step(model, adam_step)
    for name, p in params:
        full = weights.get(name)
        check_shape(path, name, full.shape, deepspeed_fence.full_shape(p))  # ZeRO-3: the real shape
        full = full.to(rt.device)
        safe_set_full_fp32_param(p, full)  # the fp32 master partition
        if has_moments:
            safe_set_full_optimizer_state(p, moments.get(f"{name}.exp_avg").to(rt.device), "exp_avg")
            safe_set_full_optimizer_state(p, moments.get(f"{name}.exp_avg_sq").to(rt.device), "exp_avg_sq")
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=rt.zero_stage == 3):
            with torch.no_grad():
                p.copy_(full)  # the working (module) copy; under ZeRO-3 re-partitioned on exit


# ---------------------------------------------------------------------------- save (collective)


def save(rt: "Runtime", run_dir: str | os.PathLike, step: int, model, optimizer, state: dict, keep_last: int,
         tokenizer_file: Path | None = None) -> Path:
    """Write checkpoint ``step`` with the commit protocol of the module docstring. Every rank calls it."""
    root, final = checkpoint_dir(run_dir), step_path(run_dir, step)
    tmp = root / f".tmp-{final.name}"
    if rt.broadcast_object(is_committed(final) if rt.is_main else None):
        return final  # this step is already committed (the same state): never replace a good checkpoint
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

    weights, moments, adam_step = owned_state(rt, model, optimizer)  # collective under ZeRO
    single = not rt.deepspeed  # one writer holds everything: plain file names other tools read
    suffix = "" if single else f"-rank{rt.rank:05d}"
    files: dict[str, dict] = {}
    try:
        if not tmp.is_dir():
            raise CheckpointError(f"{tmp} is not visible on rank {rt.rank}: run.dir must be on a filesystem "
                                  "that every node shares")
        from safetensors.torch import save_file

        written: list[str] = []
        if weights or rt.is_main:
            save_file(weights, str(tmp / f"model{suffix}.safetensors"), metadata={"format": "pt"})
            written.append(f"model{suffix}.safetensors")
            faults.trigger("save", rank=rt.rank, step=step)
            save_file(moments, str(tmp / f"optimizer{suffix}.safetensors"),
                      metadata={"format": "pt", "adam_step": str(adam_step)})
            written.append(f"optimizer{suffix}.safetensors")
        else:
            faults.trigger("save", rank=rt.rank, step=step)
        rng_name = f"rng-rank{rt.rank:05d}.json"
        (tmp / rng_name).write_text(json.dumps(rng_state()))
        written.append(rng_name)
        if rt.is_main:
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
            written.append("state.json")
            if tokenizer_file is not None:
                shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
                written.append("tokenizer.json")
        for name in written:
            fsync_path(tmp / name)
            files[name] = {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
    except Exception as e:  # torch / safetensors report a full disk as RuntimeError or SafetensorError
        error = _describe(e)
    reports = rt.gather_object((files, error))  # every rank reaches this, whatever happened above
    failed = [(r, err) for r, (_, err) in enumerate(reports) if err]
    if failed:
        if rt.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        rank, err = failed[0]
        where = f" on rank {rank}" if rt.world_size > 1 else ""
        raise CheckpointError(f"could not write checkpoint {final}{where}: {err}{_intact(run_dir)}")

    error = None
    if rt.is_main:
        try:
            manifest = {"format_version": FORMAT_VERSION, "step": step, "world_size": rt.world_size,
                        "engine": rt.engine_name, "files": {}}
            for rank_files, _ in reports:
                manifest["files"].update(rank_files)
            fsync_path(tmp)
            if final.exists():  # an uncommitted leftover of a crashed save of this step
                shutil.rmtree(final)
            tmp.rename(final)
            write_durably(final / MARKER, json.dumps(manifest, indent=1) + "\n")
            fsync_path(final)
            fsync_path(root)
            for old in complete_checkpoints(run_dir)[:-keep_last]:
                _retire(old, root / f".old-{old.name}")
        except Exception as e:
            error = _describe(e)
    error = rt.broadcast_object(error)
    if error:
        raise CheckpointError(f"could not commit checkpoint {final}: {error}{_intact(run_dir)}")
    return final


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


def load(rt: "Runtime", path: Path, model, optimizer, verify: bool = True) -> dict:
    """Restore weights, optimizer moments and this rank's RNG from a committed checkpoint; return its state.

    Works for any number of processes and any engine (see the module docstring). Every rank calls it.
    """
    manifest = read_marker(path)
    check_files(path, manifest, verify=verify)
    files = list(manifest["files"])
    weights = TensorReader(path, "model", files)
    moments = TensorReader(path, "optimizer", files)
    adam_step = int(moments.metadata.get("adam_step", 0))
    load_training_state(rt, model, optimizer, weights, moments, adam_step, path)
    rng_file = path / f"rng-rank{rt.rank:05d}.json"
    if rng_file.is_file() and manifest.get("world_size") == rt.world_size:
        set_rng_state(json.loads(rng_file.read_text()))
    return read_state(path)


def check_files(path: Path, manifest: dict, verify: bool = True) -> None:
    """Every file of the manifest is there with its size (and, with ``verify``, its sha256)."""
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if f.stat().st_size != meta["size"]:
            raise CheckpointError(f"checkpoint file {f} has {f.stat().st_size} bytes, {MARKER} says {meta['size']}")
        if verify and sha256_file(f) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {f} does not match its sha256 in {MARKER} (corrupt or changed)")


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


class Checkpointer:
    """What the training loop saves through: ``save`` at a step boundary (every rank), ``seconds`` (how
    long the last save blocked the loop: the time-limit margin), ``poll`` at each step boundary and
    ``wait`` before exiting (a pending save's outcome; saves are synchronous here, so both are no-ops)."""

    def __init__(self, rt: "Runtime", run_dir: str | os.PathLike, keep_last: int, tokenizer_file: Path | None):
        import time

        self.rt, self.run_dir, self.keep_last, self.tokenizer_file = rt, Path(run_dir), keep_last, tokenizer_file
        self.seconds = 0.0
        self.last_time = time.monotonic()
        self.last_path: Path | None = None

    def save(self, step: int, model, optimizer, state: dict) -> Path:
        import time

        t0 = time.monotonic()
        self.last_path = save(self.rt, self.run_dir, step, model, optimizer, state, self.keep_last,
                              tokenizer_file=self.tokenizer_file)
        self.last_time = time.monotonic()
        self.seconds = self.last_time - t0
        return self.last_path

    def poll(self) -> None:
        """Raise the error of a save that failed in the background (none here)."""

    def wait(self) -> Path | None:
        """Finish the pending save, if any; the newest checkpoint this run saved."""
        return self.last_path
