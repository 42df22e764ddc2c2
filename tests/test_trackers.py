"""Experiment trackers: W&B (offline) and MLflow (local file store) get exactly the records of metrics.jsonl,
once per step across a resume and across processes, and no credential reaches any file of the run."""

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
import yaml

from distllm import checkpoint
from distllm.config import LoggingConfig, load_config
from distllm.errors import UserError
from distllm.metrics import MetricsLogger, read_metrics
from distllm.trackers import TrackerUnavailable
from distllm.train import train

KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")


@pytest.fixture
def offline(monkeypatch):
    """W&B offline, quiet; MLflow's default store (the run directory's file store); both installed."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------- reading the trackers' own files


def wandb_records(path: Path):
    """The records of a W&B transaction log (``run-ID.wandb``: LevelDB-log framing of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk  # FULL / FIRST start a record, MIDDLE / LAST extend it
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def wandb_runs(run_dir: Path) -> list[tuple[str, dict[int, dict]]]:
    """(run id, {step: {key: value}}) of every offline job of the run, oldest first."""
    out = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run_id, rows = None, {}
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run_id = r.run.run_id
            elif kind == "history":
                row = {item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json)
                       for item in r.history.item}
                step = r.history.step.num
                assert step not in rows, f"{path}: step {step} twice"
                rows[step] = {k: v for k, v in row.items() if not k.startswith("_")}
        out.append((run_id, rows))
    return out


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())


def mlflow_history(run_dir: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow_client(run_dir).get_metric_history(run_id, key))


def by_step(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


RERUN = {5, 6}  # steps the resumed job computed again (after the step-4 checkpoint) and did not send again


def same_values(sent: dict[int, float], expected: dict[int, float], key: str) -> bool:
    """The tracker has every step of metrics.jsonl with its value. Steps the resumed job ran again keep the
    first job's values in the tracker: the same losses (resume is bit-exact), another throughput."""
    if sent.keys() != expected.keys():
        return False
    timing = key in ("tokens_per_s", "mfu")
    return all(sent[s] == pytest.approx(v, rel=1e-12) for s, v in expected.items() if not (timing and s in RERUN))


# ---------------------------------------------------------------------------- one run, resumed


def test_wandb_and_mlflow_get_every_record_once_across_resumes(tiny_config, offline):
    cfg = tiny_config
    run_dir = Path(cfg.run.dir)
    cfg.logging.trackers, cfg.logging.run_name = ["wandb", "mlflow"], "resume-test"
    cfg.train.max_steps, cfg.train.eval_every, cfg.checkpoint.every, cfg.logging.log_every = 8, 4, 4, 1
    cfg.train.exit_at_step = 6
    first = train(cfg)  # steps 1-6 sent, checkpoints at 4 and 6
    assert first.stopped == "train.exit_at_step"
    shutil.rmtree(first.checkpoint)  # the job died after sending steps 5 and 6 but before saving step 6
    cfg.train.exit_at_step = None
    train(cfg)  # resumes at 4: reruns 5 and 6 (not sent again), sends 7 and 8
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert ids["wandb"]["logged_through"] == ids["mlflow"]["logged_through"] == 8
    assert checkpoint.read_state(checkpoint.latest(run_dir))["trackers"] == ids  # the copy in the checkpoint

    (run_dir / "trackers.json").unlink()  # a run directory that lost it: the checkpoint's copy continues the runs
    cfg.train.max_steps = 10
    train(cfg)

    records = read_metrics(run_dir / "metrics.jsonl")
    train_steps = list(range(1, 11))
    assert [r["step"] for r in records if "lr" in r] == train_steps

    jobs = wandb_runs(run_dir)
    assert [run_id for run_id, _ in jobs] == [ids["wandb"]["run_id"]] * 3  # three jobs, one W&B run
    assert [sorted(rows) for _, rows in jobs] == [[0, 1, 2, 3, 4, 5, 6], [7, 8], [9, 10]]  # each step once
    rows = {step: row for _, job in jobs for step, row in job.items()}
    for key in (*KEYS, "val_loss", "val_ppl"):
        expected, sent = by_step(records, key), {s: row[key] for s, row in rows.items() if key in row}
        assert same_values(sent, expected, key), (key, sent, expected)

    client = mlflow_client(run_dir)
    experiment = client.get_experiment_by_name("distllm")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]]  # one MLflow run
    assert runs[0].info.run_name == "resume-test"
    for key in (*KEYS, "val_loss", "val_ppl"):
        history = mlflow_history(run_dir, ids["mlflow"]["run_id"], key)
        expected = by_step(records, key)
        assert [s for s, _ in history] == sorted(expected), key  # each step once
        assert same_values(dict(history), expected, key), (key, history, expected)
    params = runs[0].data.params
    assert params["model.n_layers"] == "2" and params["train.max_steps"] == "8"  # the first job's parameters
    assert params["logging.trackers"] == '["wandb", "mlflow"]'


# ---------------------------------------------------------------------------- two processes


def test_two_processes_log_once(tmp_path, prepared_data, offline):
    from distributed_runs import base_config, check, launch

    config = base_config(tmp_path, prepared_data)
    run_dir = tmp_path / "run"
    proc = launch(config, 2, [f"--run.dir={run_dir}", "--train.max_steps=4", "--train.eval_every=2",
                              "--logging.trackers=[wandb,mlflow]"], WANDB_MODE="offline", WANDB_SILENT="true")
    check(proc)
    assert proc.stdout.count("trackers: wandb run") == 1, proc.stdout
    records = read_metrics(run_dir / "metrics.jsonl")
    jobs = wandb_runs(run_dir)
    assert len(jobs) == 1 and sorted(jobs[0][1]) == [0, 1, 2, 3, 4]
    assert {s: row["loss"] for s, row in jobs[0][1].items() if "loss" in row} == pytest.approx(by_step(records, "loss"))
    client = mlflow_client(run_dir)
    runs = client.search_runs([client.get_experiment_by_name("distllm").experiment_id])
    assert len(runs) == 1
    assert mlflow_history(run_dir, runs[0].info.run_id, "loss") == sorted(by_step(records, "loss").items())
    assert [s for s, _ in mlflow_history(run_dir, runs[0].info.run_id, "val_loss")] == [0, 2, 4]


# ---------------------------------------------------------------------------- credentials


PLANTED = ("AKIAPLANTEDFAKEKEY0001", "plantedFakeSecret0002", "plantedFakeToken0003", "plantedUrlPassword0004")


def test_a_planted_secret_reaches_no_file_of_the_run_and_no_tracker(tiny_config, tmp_path, offline, monkeypatch,
                                                                    capsys):
    key, secret, token, password = PLANTED
    options = {"key": key, "secret": secret, "token": token, "anon": False,
               "client_kwargs": {"endpoint_url": f"http://someone:{password}@127.0.0.1:9"}}
    raw = tiny_config.to_dict()
    raw["data"]["storage_options"] = options  # a local data.dir: the options are carried, never used
    raw["logging"].update(trackers=["tensorboard", "wandb", "mlflow"], tensorboard=None, log_every=1)
    raw["train"].update(max_steps=4, eval_every=2, exit_at_step=2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))  # written by hand: save_config would redact it
    run_dir = Path(raw["run"]["dir"])
    first = ["--logging.run_name=secret-test"]
    # the resumed job also has them on its command line (W&B records the command line unless told not to)
    second = ["--train.exit_at_step=null", "--data.storage_options=" + json.dumps(options)]
    for overrides in (first, second):  # `distllm train run.yaml OVERRIDES`, in this process
        monkeypatch.setattr(sys, "argv", ["distllm", "train", str(config), *overrides])
        train(load_config(config, overrides).validate())
    out = capsys.readouterr()
    assert "resumed from" in out.out  # the redacted saved config did not look like another run's

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any("mlruns" in p.parts for p in files)
    assert any(p.name == "state.json" for p in files) and any("tfevents" in p.name for p in files)
    for path in files:
        data = path.read_bytes()
        for planted in PLANTED:
            assert planted.encode() not in data, f"{planted} found in {path}"
    assert not any(planted in out.out + out.err for planted in PLANTED)
    # the redacted values were sent: config.yaml, the checkpoint, W&B's config and MLflow's parameters hold them
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["storage_options"]
    assert saved["key"] == saved["secret"] == saved["token"] == "<redacted>"
    assert saved["client_kwargs"]["endpoint_url"] == "http://someone:<redacted>@127.0.0.1:9"
    state = checkpoint.read_state(checkpoint.latest(run_dir))
    assert state["config"]["data"]["storage_options"] == saved
    assert all(b"redacted" in p.read_bytes() for p in files if p.suffix == ".wandb")
    client = mlflow_client(run_dir)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("distllm").experiment_id])
    assert json.loads(mlflow_run.data.params["data.storage_options"]) == saved
    # `distllm eval/generate RUN_DIR` read the saved config without the placeholders (the environment's
    # credentials or an override take their place)
    from distllm.__main__ import _saved_config

    reread, _ = _saved_config(str(run_dir), [])
    assert reread.data.storage_options == {"anon": False, "client_kwargs": {"endpoint_url": "http://someone@127.0.0.1:9"}}


# ---------------------------------------------------------------------------- trackers that cannot start


def _logger(run_dir: Path, logging: LoggingConfig, config: dict | None = None) -> MetricsLogger:
    run_dir.mkdir(parents=True, exist_ok=True)
    return MetricsLogger(run_dir, enabled=True, progress=False, total_steps=4, logging=logging, config=config or {})


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError, as when it is not installed
    log = _logger(tmp_path / "run", LoggingConfig(trackers=["wandb", "tensorboard"]))
    log.check_trackers()  # not required: no error
    log.log({"step": 1, "loss": 2.0})
    log.close()
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if "wandb" in line]
    assert warning == ["warning: logging.trackers names wandb, which is not installed: pip install 'distllm[wandb]'; "
                       "training goes on without it"]
    assert list((tmp_path / "run" / "tensorboard").iterdir())  # the others go on
    required = _logger(tmp_path / "run2", LoggingConfig(trackers=["tensorboard", "wandb"], trackers_required=True))
    with pytest.raises(TrackerUnavailable, match=r"not installed: pip install 'distllm\[wandb\]' "
                                                 r"\(logging.trackers_required is true\)"):
        required.check_trackers()


def _unreachable_mlflow(monkeypatch) -> str:
    """An MLflow server URL with a password on a loopback port nothing listens on; no retries."""
    import socket

    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://someone:{PLANTED[3]}@127.0.0.1:{port}"


def test_a_tracker_that_cannot_start_is_one_warning_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = _unreachable_mlflow(monkeypatch)
    logging = LoggingConfig(trackers=["mlflow", "tensorboard"], mlflow_tracking_uri=uri)
    log = _logger(tmp_path / "run", logging, {"logging": {"mlflow_tracking_uri": uri}})
    log.check_trackers()
    for step in (1, 2):
        log.log({"step": step, "loss": 3.0 - step, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0, "mfu": 0.1})
    log.close()
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "tracker mlflow could not start" in warnings[0], out
    assert "training goes on without it" in warnings[0]
    assert PLANTED[3] not in out and "someone:<redacted>@" in out  # the server's error names the URL, redacted
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("loss")] == [2.0, 1.0]


def test_a_required_tracker_that_cannot_start_stops_the_run_before_training(tiny_config, monkeypatch):
    cfg = tiny_config
    cfg.logging.trackers, cfg.logging.trackers_required = ["mlflow"], True
    cfg.logging.mlflow_tracking_uri = _unreachable_mlflow(monkeypatch)
    with pytest.raises(UserError, match="tracker mlflow could not start.*trackers_required is true") as e:
        train(cfg)  # every rank raises it (on_main): the CLI's one line and exit 2
    assert PLANTED[3] not in str(e.value)
    assert checkpoint.latest(cfg.run.dir) is None
    assert not [r for r in read_metrics(Path(cfg.run.dir) / "metrics.jsonl") if "lr" in r]  # no step was taken


def test_printed_lines_never_show_a_credential(tmp_path, capsys):
    config = {"data": {"storage_options": {"secret": PLANTED[1]}}}
    log = _logger(tmp_path / "run", LoggingConfig(trackers=[]), config)
    log.print(f"could not reach the store with secret {PLANTED[1]} at http://someone:{PLANTED[3]}@127.0.0.1:9")
    log.close()
    assert capsys.readouterr().out == "could not reach the store with secret <redacted> at " \
                                      "http://someone:<redacted>@127.0.0.1:9\n"
