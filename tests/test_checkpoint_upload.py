"""``checkpoint.upload_to`` / ``checkpoint.resume_from: s3://...`` against a real S3-compatible server (moto) on
127.0.0.1 (the server of tests/data/conftest.py)."""

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.conftest import moto_server as s3  # noqa: F401  (the fixture: a private moto server on 127.0.0.1)
from distllm import checkpoint
from distllm.train import train

SECRET = "wJalrXUtnFEMI-not-a-real-secret"


def test_committed_checkpoints_are_uploaded_and_a_new_directory_resumes_from_the_bucket(tiny_config, tmp_path, s3,
                                                                                         caplog):
    fs = s3.filesystem()
    fs.mkdir("ckpts")
    cfg = tiny_config
    cfg.train.max_steps, cfg.train.exit_at_step, cfg.train.eval_every = 6, 4, 0
    cfg.checkpoint.every, cfg.checkpoint.keep_last = 2, 1
    straight = copy.deepcopy(cfg)
    cfg.checkpoint.upload_to = "s3://ckpts/run1"
    cfg.checkpoint.storage_options = {**s3.storage_options, "key": "AKIAFAKE", "secret": SECRET}
    first = train(cfg)  # stops at step 4 (a preemption on a node whose disk is then lost)
    assert first.checkpoint.name == "step_000004"
    assert [p.name for p in checkpoint.complete_checkpoints(cfg.run.dir)] == ["step_000004"]  # keep_last=1 here
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("ckpts/run1")) == ["step_000002", "step_000004"]
    for name in checkpoint.read_marker(first.checkpoint)["files"]:  # the same bytes, the marker too
        assert fs.cat_file(f"ckpts/run1/step_000004/{name}") == (first.checkpoint / name).read_bytes(), name
    assert fs.cat_file("ckpts/run1/step_000004/COMPLETE") == (first.checkpoint / "COMPLETE").read_bytes()
    for written in (Path(cfg.run.dir) / "config.yaml", first.checkpoint / "state.json"):
        assert SECRET not in written.read_text()  # the credentials are redacted wherever the config is written

    resumed = copy.deepcopy(cfg)  # another machine: an empty run directory, the checkpoint from the bucket
    resumed.run.dir = str(tmp_path / "elsewhere")
    resumed.checkpoint.resume_from, resumed.checkpoint.upload_to, resumed.train.exit_at_step = "s3://ckpts/run1", None, None
    with caplog.at_level(logging.INFO, logger="distllm"):
        result = train(resumed)
    assert any("downloading checkpoint s3://ckpts/run1/step_000004" in r.getMessage() for r in caplog.records)
    records = [json.loads(line) for line in (Path(resumed.run.dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "resume"] == [4]
    straight.run.dir, straight.train.exit_at_step = str(tmp_path / "straight"), None
    reference = train(straight)  # 6 steps without stopping: the resumed run matches it bit for bit
    a, b = load_file(reference.checkpoint / "model.safetensors"), load_file(result.checkpoint / "model.safetensors")
    assert result.checkpoint.name == "step_000006" and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_upload_is_one_line_and_training_goes_on(tiny_config, s3, caplog):
    cfg = tiny_config
    cfg.train.max_steps, cfg.train.eval_every = 3, 0
    cfg.checkpoint.upload_to = "s3://no-such-bucket/run"
    cfg.checkpoint.storage_options = s3.storage_options
    with caplog.at_level(logging.WARNING, logger="distllm"):
        result = train(cfg)
    assert result.checkpoint.name == "step_000003" and checkpoint.latest(cfg.run.dir) == result.checkpoint
    failed = [r.getMessage() for r in caplog.records if "could not upload" in r.getMessage()]
    assert len(failed) == 1 and "s3://no-such-bucket/run/step_000003" in failed[0], failed


def test_a_corrupt_remote_copy_is_refused_before_it_is_committed_locally(tmp_path, s3):
    """download checks each file against the manifest as it arrives: a remote copy whose bytes changed is one
    clear error, and nothing of it is left in the run directory (it would otherwise be committed locally and
    refused at load, run after run)."""
    from distllm import upload
    from distllm.distributed import local_runtime
    from distllm.errors import CheckpointError

    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 8)).sum().backward()
    opt.step()
    path = checkpoint.save(local_runtime(), tmp_path / "src", 3, model, opt, {"data": {}}, keep_last=1)
    fs = s3.filesystem()
    fs.mkdir("corrupt")
    upload.upload(path, "s3://corrupt/run/step_000003", s3.storage_options)

    good = upload.download("s3://corrupt/run/step_000003", tmp_path / "good", s3.storage_options)
    assert checkpoint.latest(tmp_path / "good") == good  # an intact copy is committed
    data = bytearray(fs.cat_file("corrupt/run/step_000003/model.safetensors"))
    data[-1] ^= 0xFF  # one bit of a weight flips in storage: the same size, another sha256
    fs.pipe_file("corrupt/run/step_000003/model.safetensors", bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors arrived 3 times .* the remote copy is corrupt"):
        upload.download("s3://corrupt/run/step_000003", tmp_path / "bad", s3.storage_options)
    left = checkpoint.checkpoint_dir(tmp_path / "bad")
    assert not any(left.iterdir()), list(left.iterdir())  # neither a committed step nor a temporary directory
    fs.pipe_file("corrupt/run/step_000003/model.safetensors", bytes(data[:-8]))  # cut short: not even hashed
    with pytest.raises(CheckpointError, match=r"arrived 3 times with \d+ bytes, its manifest says \d+"):
        upload.download("s3://corrupt/run/step_000003", tmp_path / "bad", s3.storage_options)

    data[-1] ^= 0xFF  # storage repaired; an earlier download cut short after its rename left an uncommitted copy
    fs.pipe_file("corrupt/run/step_000003/model.safetensors", bytes(data))
    (left / "step_000003").mkdir()
    (left / "step_000003" / "model.safetensors").write_bytes(b"partial")
    again = upload.download("s3://corrupt/run/step_000003", tmp_path / "bad", s3.storage_options)
    assert checkpoint.latest(tmp_path / "bad") == again and checkpoint.unverified_reason(again) is None
    with pytest.raises(CheckpointError, match="already exists; it is not replaced"):  # a committed one stays
        upload.download("s3://corrupt/run/step_000003", tmp_path / "bad", s3.storage_options)
    assert checkpoint.latest(tmp_path / "bad") == again and checkpoint.unverified_reason(again) is None
