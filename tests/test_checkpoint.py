import pytest
import torch

from distllm import checkpoint
from distllm.errors import CheckpointError


class Tiny(torch.nn.Module):
    def __init__(self, width=8, tied=True):
        super().__init__()
        self.emb = torch.nn.Embedding(16, width)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, 16, bias=False)
        if tied:
            self.head.weight = self.emb.weight


def _save(run_dir, step, model=None, keep_last=3):
    model = model or Tiny()
    opt = torch.optim.AdamW(model.parameters())
    model.head(model.emb(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    return checkpoint.save(run_dir, step, model, opt, {"data": {"epoch": 0, "sample_index": step}}, keep_last)


def test_save_is_complete_and_loads_back(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    path = _save(tmp_path, 5, model)
    assert path.name == "step_000005"
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "model.safetensors", "optimizer.pt", "rng.pt", "state.json"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]

    fresh = Tiny()
    opt = torch.optim.AdamW(fresh.parameters())
    state = checkpoint.load(path, fresh, opt)
    assert state["step"] == 5 and state["data"]["sample_index"] == 5
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh.head.weight.data_ptr() == fresh.emb.weight.data_ptr()  # still tied after loading
    assert opt.state_dict()["state"][0]["step"] == 1


def test_latest_ignores_incomplete_and_keep_last_prunes(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    # a crash mid-save leaves a directory without the marker: it must never be picked
    half = checkpoint.checkpoint_dir(tmp_path) / "step_000009"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"garbage")
    assert checkpoint.latest(tmp_path).name == "step_000004"
    assert checkpoint.resolve("latest", tmp_path).name == "step_000004"
    with pytest.raises(CheckpointError, match="incomplete"):
        checkpoint.resolve(str(half), tmp_path)


def test_resolve(tmp_path):
    assert checkpoint.resolve(None, tmp_path) is None
    assert checkpoint.resolve("latest", tmp_path) is None  # nothing yet: start from scratch
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        checkpoint.resolve(str(tmp_path / "missing"), tmp_path)


def test_resave_same_step_replaces_atomically(tmp_path):
    _save(tmp_path, 3)
    path = _save(tmp_path, 3)
    assert (path / "COMPLETE").is_file()
    assert [p.name for p in path.parent.iterdir()] == ["step_000003"]


def test_mismatched_model_is_a_clear_error(tmp_path):
    path = _save(tmp_path, 1, Tiny(width=8))
    with pytest.raises(CheckpointError, match="cannot load weights") as e:
        checkpoint.load(path, Tiny(width=12))
    message = str(e.value)
    assert "\n" not in message  # one line, not torch's multi-line load_state_dict report
    assert "size mismatch for" in message and "more)" in message and "model section" in message


def test_corrupt_weights_are_a_clear_error(tmp_path):
    path = _save(tmp_path, 1)
    (path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint.load(path, Tiny())


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
