"""Checkpoint format, commit protocol and safe loading, in one process (multi-process faults are in
tests/test_fault_tolerance.py)."""

import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from distllm import checkpoint, faults
from distllm.distributed import local_runtime
from distllm.errors import CheckpointError


class Tiny(torch.nn.Module):
    def __init__(self, width=8, tied=True):
        super().__init__()
        self.emb = torch.nn.Embedding(16, width)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, 16, bias=False)
        if tied:
            self.head.weight = self.emb.weight


def _trained(model=None, steps=2, opt=None):
    model = model or Tiny()
    opt = opt or torch.optim.AdamW(model.parameters(), fused=True)
    for _ in range(steps):
        model.head(model.norm(model.emb(torch.tensor([1, 2])))).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(run_dir, step, model=None, keep_last=3):
    model, opt = _trained(model)
    return checkpoint.save(local_runtime(), run_dir, step, model, opt,
                           {"data": {"epoch": 0, "sample_index": step}}, keep_last)


def test_save_commits_and_loads_back_exactly(tmp_path):
    torch.manual_seed(0)
    model, opt = _trained()
    path = checkpoint.save(local_runtime(), tmp_path, 5, model, opt, {"data": {"sample_index": 5}}, keep_last=2)
    assert path.name == "step_000005"
    names = sorted(p.name for p in path.iterdir())
    assert names == ["COMPLETE", "model.safetensors", "optimizer.safetensors", "rng-rank00000.json", "state.json"]
    manifest = json.loads((path / "COMPLETE").read_text())  # the marker is a manifest of sizes and checksums
    assert set(manifest["files"]) == set(names) - {"COMPLETE"}
    assert all(m["size"] == (path / n).stat().st_size for n, m in manifest["files"].items())
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]

    fresh = Tiny()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), fused=True)
    state = checkpoint.load(local_runtime(), path, fresh, fresh_opt)
    assert state["step"] == 5 and state["data"]["sample_index"] == 5
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    assert fresh.head.weight.data_ptr() == fresh.emb.weight.data_ptr()  # still tied after loading
    for p, q in zip(model.parameters(), fresh.parameters()):
        a, b = opt.state[p], fresh_opt.state[q]
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert float(a["step"]) == float(b["step"]) == 2
    # one more identical step of each optimizer gives identical weights (bias correction uses the restored step)
    before = model.emb.weight.detach().clone()
    _trained(model, 1, opt), _trained(fresh, 1, fresh_opt)
    assert not torch.equal(model.emb.weight, before)  # the step moved the weights
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


def test_latest_ignores_uncommitted_and_keep_last_prunes_marker_first(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    root = checkpoint.checkpoint_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_000003", "step_000004"]
    # a crash between the rename and the marker leaves a directory without COMPLETE: never picked
    torn = root / "step_000009"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"garbage")
    (root / ".tmp-step_000010").mkdir()
    assert checkpoint.latest(tmp_path).name == "step_000004"
    assert checkpoint.resolve("latest", tmp_path).name == "step_000004"
    with pytest.raises(CheckpointError, match="not committed"):
        checkpoint.resolve(str(torn), tmp_path)
    removed = checkpoint.remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-step_000010", "step_000009"]
    assert sorted(p.name for p in root.iterdir()) == ["step_000003", "step_000004"]


def test_every_file_is_on_disk_before_the_commit_marker_exists(tmp_path, monkeypatch):
    """A power cut right after COMPLETE must not leave a committed checkpoint whose files were only in
    the page cache: each file the marker lists was fsynced while the marker did not exist yet."""
    marker = checkpoint.step_path(tmp_path, 1) / checkpoint.MARKER
    synced: set[str] = set()  # names fsynced before the marker appeared
    real_fsync = os.fsync

    def fsync(fd):
        if not marker.exists():
            synced.add(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = _save(tmp_path, 1)
    files = set(checkpoint.read_marker(path)["files"])
    assert files and files <= synced, files - synced


@pytest.mark.parametrize("fail", ["writing", "committing"])
@pytest.mark.parametrize("keep_last", [1, 2])
def test_a_failed_save_prunes_no_checkpoint(tmp_path, monkeypatch, keep_last, fail):
    """Retention deletes old checkpoints only after the new one is committed: a save that fails while
    writing its files, or at its commit marker, leaves all keep_last earlier checkpoints loadable."""
    kept = [_save(tmp_path, step, keep_last=keep_last) for step in range(1, keep_last + 1)]
    if fail == "writing":
        monkeypatch.setattr(faults, "_FAULTS", faults._parse("enospc@save"))
    else:
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name == checkpoint.MARKER:
                raise OSError(errno.ENOSPC, "No space left on device (test)")
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointError, match="no space left on device"):
        _save(tmp_path, keep_last + 1, keep_last=keep_last)
    assert checkpoint.complete_checkpoints(tmp_path) == kept
    monkeypatch.undo()
    _save(tmp_path, keep_last + 2, keep_last=keep_last)  # the next good save does prune
    assert checkpoint.complete_checkpoints(tmp_path) == kept[1:] + [checkpoint.step_path(tmp_path, keep_last + 2)]


def test_resolve_and_locate(tmp_path):
    assert checkpoint.resolve(None, tmp_path) is None
    assert checkpoint.resolve("latest", tmp_path) is None  # nothing yet: start from scratch
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        checkpoint.resolve(str(tmp_path / "missing"), tmp_path)
    path = _save(tmp_path, 7)
    assert checkpoint.resolve("step_000007", tmp_path) == path
    assert checkpoint.locate(tmp_path) == path and checkpoint.locate(path) == path
    with pytest.raises(CheckpointError, match=r"'\.\.'"):
        checkpoint.resolve("../other/checkpoints/step_000007", tmp_path)
    with pytest.raises(CheckpointError, match=r"'\.\.'"):
        checkpoint.locate(str(tmp_path / ".." / tmp_path.name))


def test_a_committed_step_is_never_replaced(tmp_path):
    path = _save(tmp_path, 3)
    before = (path / "model.safetensors").read_bytes()
    assert _save(tmp_path, 3, Tiny(width=8)) == path
    assert (path / "model.safetensors").read_bytes() == before


def test_mismatched_model_is_a_clear_error(tmp_path):
    path = _save(tmp_path, 1, Tiny(width=8))
    model = Tiny(width=12)
    with pytest.raises(CheckpointError, match="size mismatch for emb.weight") as e:
        checkpoint.load(local_runtime(), path, model, torch.optim.AdamW(model.parameters()))
    assert "\n" not in str(e.value) and "model section" in str(e.value)


def test_corrupt_or_changed_files_are_refused(tmp_path):
    path = _save(tmp_path, 1)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit, same size
    (path / "model.safetensors").write_bytes(bytes(data))
    model = Tiny()
    with pytest.raises(CheckpointError, match="model.safetensors does not match its sha256"):
        checkpoint.load(local_runtime(), path, model, torch.optim.AdamW(model.parameters()))
    (path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors has 10 bytes"):
        checkpoint.load(local_runtime(), path, model, torch.optim.AdamW(model.parameters()))


class Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_a_malicious_pickle_is_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _save(tmp_path / "run", 1)
    evil = pickle.dumps(Payload())
    (path / "optimizer.safetensors").write_bytes(evil)  # and a manifest that vouches for it
    manifest = json.loads((path / "COMPLETE").read_text())
    manifest["files"]["optimizer.safetensors"] = {"size": len(evil), "sha256": checkpoint.sha256_file(
        path / "optimizer.safetensors")}
    (path / "COMPLETE").write_text(json.dumps(manifest))
    model = Tiny()
    with pytest.raises(CheckpointError, match="cannot read .*optimizer.safetensors"):
        checkpoint.load(local_runtime(), path, model, torch.optim.AdamW(model.parameters()))
    assert not (tmp_path / "PWNED").exists()


def test_manifest_names_cannot_escape_the_checkpoint(tmp_path):
    path = _save(tmp_path, 1)
    manifest = json.loads((path / "COMPLETE").read_text())
    manifest["files"]["../../secret"] = {"size": 1, "sha256": "0"}
    (path / "COMPLETE").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        checkpoint.read_marker(path)
    assert checkpoint.latest(tmp_path) is None


@pytest.mark.parametrize("entry", [None, 7, {"size": 1}, {"size": "1", "sha256": "0" * 64}, {"size": 1, "sha256": "0"},
                                   {"size": 1, "sha256": "G" * 64}])
def test_a_malformed_manifest_entry_is_one_clear_error(tmp_path, entry):
    path = _save(tmp_path, 1)
    manifest = json.loads((path / "COMPLETE").read_text())
    manifest["files"]["model.safetensors"] = entry
    (path / "COMPLETE").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="entry for model.safetensors is not a size and a sha256"):
        checkpoint.read_marker(path)
    assert checkpoint.latest(tmp_path) is None


def test_old_format_is_refused_with_its_version(tmp_path):
    path = checkpoint.step_path(tmp_path, 1)
    path.mkdir(parents=True)
    (path / "COMPLETE").write_text("ok\n")
    with pytest.raises(CheckpointError, match="format version"):
        checkpoint.read_marker(path)


@pytest.fixture
def small_disk(mount_tmpfs):
    return mount_tmpfs("96k")


def test_full_disk_keeps_previous_checkpoint(small_disk):
    first = _save(small_disk, 1, Tiny(width=8))  # fits
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with pytest.raises(CheckpointError, match="no space left on device.*step_000001 is intact"):
        _save(small_disk, 2, Tiny(width=256))  # does not fit
    assert checkpoint.latest(small_disk) == first
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert [p.name for p in checkpoint.checkpoint_dir(small_disk).iterdir()] == ["step_000001"]  # no temp left


def test_files_are_readable_by_the_team(tmp_path):
    """Every checkpoint file gets 0666 minus the umask (0644 under 022); safetensors' writer left 0600."""
    old = os.umask(0o022)
    try:
        path = _save(tmp_path, 1)
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in path.iterdir()}
    assert modes == dict.fromkeys(modes, "0o644"), modes


def test_files_are_hashed_in_the_pass_that_writes_them(tmp_path, monkeypatch):
    """No file is read back to hash it while saving; the manifest's sha256 are those of the files on disk."""
    def no_reading(path, *a, **k):
        raise AssertionError(f"{path} read back to hash it")

    monkeypatch.setattr(checkpoint, "sha256_file", no_reading)
    path = _save(tmp_path, 1)
    monkeypatch.undo()
    files = checkpoint.read_marker(path)["files"]
    assert {n: m["sha256"] for n, m in files.items()} == {n: checkpoint.sha256_file(path / n) for n in files}


def test_the_index_maps_every_parameter_to_its_pieces(tmp_path):
    model, _ = _trained()
    path = _save(tmp_path, 1, model)
    manifest = checkpoint.read_marker(path)
    assert manifest["format_version"] == 3 and manifest["adam_step"] == 2
    assert set(manifest["params"]) == {n for n, _ in model.named_parameters()}  # tied: once
    emb = manifest["params"]["emb.weight"]
    assert emb == {"shape": [16, 8], "pieces": [{"file": "model.safetensors", "tensor": "emb.weight", "offset": 0,
                                                "start": 0, "numel": 128}]}
    reader = checkpoint.TensorReader(path)
    assert torch.equal(reader.read("emb.weight", "weight", 50, 90), model.emb.weight.detach().flatten()[50:90])


def test_ddp_ranks_share_the_writing():
    owners = checkpoint.ddp_writers([100, 10, 60, 50, 1], 2)
    assert owners == [0, 0, 1, 1, 0]  # 111 / 110 elements
    assert checkpoint.ddp_writers([5, 5], 3) == [0, 1]  # a rank may have nothing to write


def _checkpointer(run_dir, keep_last=3):
    return checkpoint.Checkpointer(local_runtime(), run_dir, keep_last, None, async_save=True)


def test_async_save_commits_at_a_later_boundary_once_written(tmp_path, monkeypatch):
    """The loop goes on while the files are written; poll commits only once they are durable; the next save
    waits for the one in flight; the checkpoint loads back exactly."""
    import threading

    release, real_write = threading.Event(), checkpoint.tensorfile.write

    def slow_write(*args, **kwargs):
        assert release.wait(30)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(checkpoint.tensorfile, "write", slow_write)
    model, opt = _trained()
    saver = _checkpointer(tmp_path)
    path = saver.save(1, model, opt, {"data": {}})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _trained(model, 1, opt)  # training goes on: the snapshot was taken at the boundary
    saver.poll()
    assert not checkpoint.is_committed(path) and checkpoint.latest(tmp_path) is None
    release.set()
    assert saver.wait() == path and checkpoint.latest(tmp_path) == path
    fresh = Tiny()
    checkpoint.load(local_runtime(), path, fresh, torch.optim.AdamW(fresh.parameters(), fused=True))
    assert all(torch.equal(saved[k], v) for k, v in fresh.state_dict().items())
    assert saver.seconds < 5 and saver.exit_seconds >= saver.seconds

    release.clear()
    saver.save(2, model, opt, {"data": {}})
    threading.Timer(0.5, release.set).start()
    saver.save(3, model, opt, {"data": {}})  # waits for step 2's commit first: at most one in flight
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_000001", "step_000002"]
    saver.wait()
    assert checkpoint.latest(tmp_path).name == "step_000003"


def test_async_save_on_a_full_disk_stops_at_the_next_boundary(small_disk):
    first = _save(small_disk, 1, Tiny(width=8))
    model, opt = _trained(Tiny(width=256))
    saver = _checkpointer(small_disk)
    saver.save(2, model, opt, {"data": {}})  # returns: the write fails in the background
    with pytest.raises(CheckpointError, match="could not write checkpoint .*step_000002: no space left on device; "
                                              "the previous checkpoint .*step_000001 is intact") as e:
        saver._thread.join()
        saver.poll()
    assert "\n" not in str(e.value)
    assert checkpoint.latest(small_disk) == first
    assert [p.name for p in checkpoint.checkpoint_dir(small_disk).iterdir()] == ["step_000001"]


def test_a_loaded_optimizer_does_not_keep_the_checkpoint_mapped(tmp_path):
    """safetensors returns views of a private memory map of the file: kept as AdamW's moments, they held the
    checkpoint's pages (and, after retention deleted it, its disk space) for the rest of the run."""
    import gc

    path = _save(tmp_path, 1)
    fresh = Tiny()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), fused=True)
    checkpoint.load(local_runtime(), path, fresh, fresh_opt)
    gc.collect()
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(path) in line]
    assert not mapped, mapped
    assert all(st["exp_avg"].abs().sum() > 0 for st in fresh_opt.state.values())
