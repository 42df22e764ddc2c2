"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) behind one small interface.

``MetricsLogger`` (``metrics.py``) is the one fan-out point: on the main process it starts the
trackers named in ``logging.trackers`` with ``start_tracker``, sends every record it writes to
``metrics.jsonl`` to each of them, and closes them. A tracker is one run in one tool::

    tracker = start_tracker("wandb", TrackerRun(run_dir, project, name, config, ...))  # or TrackerUnavailable
    tracker.run_id                                        # continues this run on resume (None: TensorBoard)
    tracker.log(step, {"loss": 2.31, "lr": 3e-4}, wall_time)
    tracker.close()

Resuming. ``RUN_DIR/trackers.json`` holds ``{name: {"run_id", "logged_through", "keys"}}`` for the
trackers that have run ids (W&B, MLflow): the run, the last step sent and the keys sent at that
step, written before each record is sent; each checkpoint's ``state.json`` holds a copy under
``"trackers"``. A resumed job continues the same runs (W&B ``id=..., resume="allow"``, which keeps
the id in offline mode too; MLflow ``run_id``), from ``trackers.json``, or from the checkpoint's
copy when the run directory lost that file (only for a checkpoint of this run directory:
continuing another run's checkpoint into a new ``run.dir`` starts new tracker runs). Neither tool
replaces a value once written (W&B drops a step below its current one; MLflow keeps both values),
so nothing the interrupted job already sent after its last checkpoint is sent again: a record goes
out when its step is past ``logged_through``, and at that step only its other keys (a validation
record the job did not reach). The tracker keeps the first job's values for the steps run twice
(the same losses: resume is bit-exact; another throughput); ``metrics.jsonl`` and TensorBoard
(purged from the resumed step on) hold the rerun's.

Offline. ``WANDB_MODE=offline`` writes ``RUN_DIR/wandb/offline-run-*`` (one directory per job, all
with the run's id; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads them as one run, in order).
MLflow's default here is the local file store ``RUN_DIR/mlruns`` (MLflow 3 refuses a file store
unless ``MLFLOW_ALLOW_FILE_STORE=true``, which is set for it).

Secrets. Trackers get the redacted config (``distllm.redact``). W&B's console capture is off (the
console may print anything), and its system metadata, which records the command line, is off when
the command line holds a credential.

Why not Accelerate's tracker API (``Accelerator(log_with=...)``, ``init_trackers``,
``accelerator.log``): it starts all trackers in one loop, so one that cannot start stops the
others and the run, and ``accelerator.log`` raises a tracker's error into the training loop; its
main-process check uses Accelerate's process counters (``PartialState``), which DESIGN.md found wrong
under DeepSpeed on CPU (``num_processes`` 1 of 2), where we take ranks from torch.distributed; ``log_with`` must be given when the ``Accelerator`` is built, before the run
directory and the resume decision exist; resuming is only ``init_kwargs`` passed through (W&B
``id``, MLflow ``run_id``, itself overridden by ``MLFLOW_RUN_ID``), with no record of what was
already sent; its MLflow tracker takes the tracking URI only from the environment; its
TensorBoard tracker has no purge on resume. The three classes below make the same calls as its
tracker classes (``wandb.init`` / ``run.log``, MLflow runs and batched parameters, ``SummaryWriter``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from distllm.errors import UserError
from distllm.redact import redact_text

STATE_FILE = "trackers.json"
EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
"""Tracker name -> (module it needs, distllm extra that installs it)."""


class TrackerUnavailable(UserError):
    """A tracker named in ``logging.trackers`` is not installed or could not start."""


@dataclass
class TrackerRun:
    """What every tracker starts from."""

    run_dir: Path
    project: str
    name: str
    config: dict = field(repr=False)
    """The resolved config with credentials redacted (sections of keys)."""
    run_id: str | None = None
    """The tracker's run to continue (a resumed job), None for a new run."""
    resume_step: int | None = None
    """The step of the checkpoint this job resumed from (None: a fresh run)."""
    mlflow_tracking_uri: str | None = None
    hide_command_line: bool = False
    """The command line holds a credential: trackers must not record it."""
    say: Callable[[str], None] = print
    """Prints one line to the console (redacted)."""


class Tracker:
    """One run in one experiment tracker."""

    name = ""
    run_id: str | None = None
    rewrites_on_resume = False
    """True: records sent after a resume replace those of the steps after the checkpoint (TensorBoard's
    purge), so nothing is skipped; False: a step once sent is never sent again."""

    def log(self, step: int, values: dict[str, float], wall_time: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return self.name


def start_tracker(name: str, run: TrackerRun) -> Tracker:
    """Start tracker ``name`` (one of ``distllm.config.TRACKERS``); ``TrackerUnavailable`` with one line if it
    is not installed or cannot start."""
    module, extra = EXTRAS.get(name, (None, None))
    if module is not None:
        try:
            __import__(module)
        except ImportError:
            raise TrackerUnavailable(
                f"logging.trackers names {name}, which is not installed: pip install 'distllm[{extra}]'"
            ) from None
    try:
        return {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}[name](run)
    except Exception as e:  # no login, unreachable server, bad project name: the tool's own words
        raise TrackerUnavailable(redact_text(f"tracker {name} could not start: {first_line(e)}")) from None


# ---------------------------------------------------------------------------- the trackers


class TensorBoardTracker(Tracker):
    """``RUN_DIR/tensorboard`` event files; on resume the steps after the checkpoint are purged and rewritten."""

    name = "tensorboard"
    rewrites_on_resume = True

    def __init__(self, run: TrackerRun):
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        purge = run.resume_step + 1 if run.resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(run.run_dir / "tensorboard"), purge_step=purge)
        if run.resume_step is None:  # the config as text (TensorBoard's Text tab), indented = code
            text = yaml.safe_dump(run.config, sort_keys=False)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def log(self, step: int, values: dict[str, float], wall_time: float) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step, walltime=wall_time)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run (``wandb.init``); its files in ``RUN_DIR/wandb``. ``WANDB_MODE``, ``WANDB_ENTITY``
    and the login come from W&B's usual environment variables and files."""

    name = "wandb"

    def __init__(self, run: TrackerRun):
        import wandb

        # no console capture (the console may print anything); no system metadata, which records the command
        # line, when that holds a credential (an experimental setting: if W&B drops it, this run cannot start)
        settings = wandb.Settings(console="off", **({"x_disable_meta": True} if run.hide_command_line else {}))
        self.run = wandb.init(project=run.project, name=run.name, id=run.run_id,
                              resume="allow" if run.run_id else None, dir=str(run.run_dir),
                              reinit="create_new", settings=settings)
        self.run.config.update(run.config, allow_val_change=True)
        self.run_id = self.run.id
        self.offline = self.run.offline
        self.last_step = -1

    def log(self, step: int, values: dict[str, float], wall_time: float) -> None:
        if step < self.last_step:  # W&B steps only grow: a record found late (a spike at the next log line)
            return
        self.last_step = step
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()

    def describe(self) -> str:
        return f"wandb run {self.run_id}" + (" (offline)" if self.offline else "")


class MlflowTracker(Tracker):
    """An MLflow run, through ``MlflowClient`` (no global active run, no ``MLFLOW_RUN_ID`` taking over)."""

    name = "mlflow"

    def __init__(self, run: TrackerRun):
        uri = run.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
            (run.run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:  # MLflow 3 refuses its file store without this
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client, self.uri = MlflowClient(tracking_uri=uri), uri
        existing = None
        if run.run_id is not None:
            try:
                existing = self.client.get_run(run.run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                run.say(f"mlflow: run {run.run_id} is not in {uri}; starting a new run")
        if existing is not None:
            self.run_id = existing.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            logged = existing.data.params
        else:
            from mlflow.tracking.context.registry import resolve_tags  # user, source: what mlflow.start_run adds

            experiment = self.client.get_experiment_by_name(run.project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(run.project)
            created = self.client.create_run(experiment_id, run_name=run.name,
                                             tags=resolve_tags({"mlflow.runName": run.name}))
            self.run_id, logged = created.info.run_id, {}
        params = flat_params(run.config)
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:  # MLflow parameters cannot change: the run keeps the first job's values
            run.say(f"mlflow: run {self.run_id} keeps its first values of {', '.join(changed[:6])}"
                    + (" ..." if len(changed) > 6 else ""))
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def log(self, step: int, values: dict[str, float], wall_time: float) -> None:
        from mlflow.entities import Metric

        ms = int(wall_time * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")

    def describe(self) -> str:
        return f"mlflow run {self.run_id} in {self.uri}"


# ---------------------------------------------------------------------------- records, parameters, resume state


def tracker_values(record: dict) -> dict[str, float]:
    """The numeric values of a metrics record (not ``step`` / ``time``); a nested mapping of numbers
    (``{"eval": {"hellaswag": 0.31}}``) becomes ``eval/hellaswag``. Lists (a spike's samples) are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "time"):
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value


def flat_params(config: dict) -> dict[str, str]:
    """``{"train": {"max_steps": 10}}`` -> ``{"train.max_steps": "10"}`` (mappings and lists as JSON)."""
    out = {}
    for section, values in config.items():
        for key, value in (values or {}).items():
            text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
            out[f"{section}.{key}"] = text[:MAX_PARAM_CHARS]
    return out


def read_state(run_dir: Path) -> dict | None:
    """``RUN_DIR/trackers.json`` (None if absent or unreadable)."""
    try:
        state = json.loads((Path(run_dir) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


def write_state(run_dir: Path, state: dict) -> None:
    """Replace ``RUN_DIR/trackers.json`` atomically (no fsync: it is rewritten at every logged step; a lost
    update can only make a resumed job skip less, never send a step twice, as the file is written first)."""
    path = Path(run_dir) / STATE_FILE
    tmp = path.with_name(STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, path)


def resume_state(run_dir: Path, resumed_from: Path | None) -> dict:
    """The tracker runs a job continues: ``{name: {"run_id", "logged_through", "keys"}}``; {} for a fresh run.

    ``trackers.json`` of the run directory, else the copy in the checkpoint it resumed from when that
    checkpoint belongs to this run directory."""
    if resumed_from is None:
        return {}
    saved = read_state(run_dir)
    if saved is not None:
        return saved
    if Path(resumed_from).resolve().parent != (Path(run_dir) / "checkpoints").resolve():
        return {}  # another run's checkpoint continued into this run directory: new tracker runs
    try:
        state = json.loads((Path(resumed_from) / "state.json").read_text()).get("trackers")
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    return state if isinstance(state, dict) else {}


def first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
