"""Run configuration: one small dataclass per component, YAML files, CLI overrides, validation.

A run file lists only what differs from the defaults below::

    model:
      n_layers: 6
    train:
      max_steps: 300

and any value can be overridden on the command line with ``--section.key=value``
(the value is parsed as YAML, so ``--train.max_steps=10`` is an int and
``--checkpoint.resume_from=null`` is None).

Everything is validated before anything is created or started: unknown keys (with a
suggestion), wrong types, non-positive sizes and inconsistent combinations all raise
``ConfigError`` with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from distllm.batch_plan import plan_problems
from distllm.errors import ConfigError
from distllm.model.config import ModelConfig
from distllm.redact import redact


@dataclass
class RunConfig:
    dir: str = "runs/debug"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, checkpoints."""
    lock_stale_minutes: float = 10.0
    """``train`` holds ``run.dir/run.lock`` while it runs (a second run there is refused). A lock whose holder
    the OS lock cannot vouch for (another host, on a filesystem without cross-node flock) is taken over once
    its heartbeat is this old; see distllm/run_lock.py."""


@dataclass
class DataConfig:
    source: str = "python-stdlib"
    """Corpus: ``python-stdlib`` (the running interpreter's standard library sources, on every
    machine), a local file / directory / glob of ``.txt``, ``.jsonl``/``.json`` or ``.parquet``
    files, or a Hugging Face dataset name (``hf:NAME`` or ``NAME``)."""
    text_field: str = "text"
    """Field that holds the document text in ``.jsonl``/``.parquet``/Hub datasets."""
    hf_config: Optional[str] = None
    """Configuration name of a Hugging Face dataset."""
    hf_split: str = "train"
    """Split of a Hugging Face dataset to read."""
    dir: str = "data/python-stdlib"
    """Output of ``distllm prepare`` and input of training: tokenizer.json, shards, manifest.json."""
    seq_len: int = 256
    """Tokens per training sample (the model sees windows of seq_len + 1 tokens)."""
    mix: Optional[dict[str, float]] = None
    """Train on several prepared data directories mixed by weight, e.g. ``{data/web: 0.7, data/code: 0.3}``
    (weights are normalised; all made with one tokenizer). None: the train split of ``data.dir``.
    Validation always reads the val split of ``data.dir``."""
    prefetch: int = 2
    """Micro-batches a background thread reads ahead of the training step (0 = read in the step)."""
    document_mask: bool = False
    """Keep attention inside documents: the loader gives each window's document ids (split at end-of-text)."""
    verify_shards: bool = True
    """Check each shard's sha256 and token ids against the manifest before its first use (once per
    shard per run, in background threads ahead of the batches); false: header and size only."""
    val_fraction: float = 0.01
    """About this fraction of the documents is held out for validation (at least one), chosen by a hash
    of each text: the same text always lands in the same split, whatever else is in the corpus."""
    cache_dir: Optional[str] = None
    """Local cache of a remote ``data.dir`` (``s3://...`` or any fsspec URL), one sub-directory per URL
    (None = ``$DISTLLM_CACHE_DIR/data``, else ``~/.cache/distllm/data``). Shards are downloaded whole and checked
    against the manifest's size and sha256 before use; later runs and epochs read the cached copies."""
    storage_options: Optional[dict] = None
    """Options of the fsspec filesystem of a remote ``data.dir``, e.g. ``{client_kwargs: {endpoint_url:
    "http://127.0.0.1:9000"}}`` for an S3-compatible server. Prefer the backend's environment variables
    (``AWS_*``) for credentials. Credentials given here (keys named like ``key``, ``secret``, ``token``,
    ``password``, ``credential``; a password in a URL) are redacted from every copy of the config that
    is written or sent (``run.dir/config.yaml``, checkpoints, experiment trackers, log lines), so
    ``distllm eval/generate RUN_DIR`` and a run resumed from another config do not see them: give them
    again through the environment or an override (``--data.storage_options={key: ..., secret: ...}``)."""
    storage_retries: int = 5
    """Retries of a failed remote read (connection errors) before a clear error naming the file."""
    storage_backoff: float = 0.5
    """Seconds before the first retry of a remote read; doubled for each further one (at most 30 s)."""
    read_ahead_shards: int = 2
    """Shards of a remote ``data.dir`` downloaded in the background ahead of the one being read (0 = off)."""
    shard_tokens: int = 50_000_000
    """Maximum tokens per shard file."""
    max_documents: Optional[int] = None
    """Use at most this many documents of the corpus (None = all)."""
    num_proc: Optional[int] = None
    """``prepare`` processes. None: one per CPU core; 1: the main process alone, with the Rust tokenizer's
    threads on all cores; k > 1: k single-threaded worker processes. The output does not depend on it."""
    dedup: bool = False
    """``prepare``: drop exact-duplicate documents (the same text, by 128-bit hash); the first copy in
    corpus order is kept."""
    overwrite: bool = False
    """``prepare``: replace a ``data.dir`` already prepared from other settings or files, and a different
    tokenizer.json in it (never one that complete checkpoints in ``run.dir`` were trained with).
    Without it, both are refused."""
    tokenizer_sample_bytes: int = 1_000_000_000
    """``prepare``: train the tokenizer on at most this much training text: all of it when the corpus
    is smaller, else an equal share of every part of the corpus."""


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    """Vocabulary size of the trained byte-level BPE tokenizer."""
    path: Optional[str] = None
    """Use this existing tokenizer.json instead of training one."""
    min_frequency: int = 2
    """Minimum pair frequency for a BPE merge."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Floor of the decay, as a fraction of ``lr``."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """``cosine``: warmup then cosine decay to the floor; ``wsd``: warmup, stable, then linear
    decay to the floor over the last ``decay_fraction`` of training; ``constant``: warmup then flat."""
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    """Fraction of training spent decaying in the ``wsd`` schedule."""
    weight_decay: float = 0.1
    """Applied to matrices (linear and embedding weights) only; never to norms or biases."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    fused: Optional[bool] = None
    """Fused AdamW kernel (None = on for CUDA and CPU, where torch has one)."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps."""
    seed: int = 1337
    """Seeds the model initialisation (the same on every process) and the data order."""
    micro_batch_size: Optional[int] = None
    """Sequences per forward/backward pass on each process. None: the largest that divides
    global_batch_size / processes, at most 16 (``distllm.batch_plan``; the run's first line says which)."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all processes; a multiple of micro_batch_size x processes."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on a GPU that supports it, fp32 otherwise."""
    compile: bool = False
    """``torch.compile`` each transformer block (after the data-parallel wrap, so gradient
    all-reduce still overlaps the backward pass)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    eval_every: int = 100
    """Validation every this many steps (0 = only at the end)."""
    eval_batches: int = 20
    """Validation micro-batches of ``micro_batch_size`` (the same samples for any number of processes)."""
    eval_tasks: list[str] = field(default_factory=list)
    """Multiple-choice task files (JSONL; HellaSwag / ARC / PIQA / SciQ field names) scored with the validation
    loss at every ``eval_every`` and at the end, as lm-evaluation-harness 0.4 scores them: ``eval/<task>/acc``,
    ``eval/<task>/acc_norm`` (and their standard errors) in metrics.jsonl, the trackers and ``distllm plot``."""
    exit_at_step: Optional[int] = None
    """Save a checkpoint and exit 0 when the global step reaches this (the schedule still follows
    max_steps): time-boxed jobs continue with the same command."""
    time_limit: Optional[str] = None
    """Wall-clock budget of this job, e.g. ``"3:50:00"``, ``"90m"``, ``"4h"``: save and exit 0 before it
    ends (a margin of the slowest step plus the last save's duration is kept)."""
    on_nonfinite: Literal["skip", "halt"] = "halt"
    """A non-finite loss or gradient on any process: ``skip`` drops the step (parameters unchanged; logged)
    and stops after ``max_skipped_steps`` consecutive skips; ``halt`` stops at once, naming the last good checkpoint."""
    max_skipped_steps: int = 5
    """With ``on_nonfinite: skip``: stop after this many consecutive skipped steps."""
    spike_factor: float = 3.0
    """Log a loss spike when a step's loss exceeds this factor times the recent mean (0 = off), with the
    global sample indices of its batch."""
    debug: bool = False
    """Debug mode on one process: small batch, anomaly detection, synchronous CUDA errors,
    deterministic algorithms, no compile, and a first-batch overfit check (same code path as a real run)."""


@dataclass
class DistributedConfig:
    zero_stage: Optional[int] = None
    """DeepSpeed ZeRO stage 0-3 (0 = DeepSpeed data parallel). None: whatever the launcher says
    (``accelerate launch`` with a DeepSpeed config), else plain DDP."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """ZeRO: keep optimizer state (and its step) in CPU memory."""
    offload_params: Literal["none", "cpu"] = "none"
    """ZeRO-3: keep parameters in CPU memory."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON merged under distllm's values; a batch size, accumulation, clipping or precision
    in it that disagrees with this config is an error."""
    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"
    """DeepSpeed under bf16: the dtype gradients accumulate in over micro-batches (``data_types.grad_accum_dtype``).
    fp32 matches DDP under autocast; for ZeRO-1 it costs a whole fp32 gradient (DeepSpeed's BF16_Optimizer),
    4 bytes per parameter (docs/scaling.md); bf16 gives that back at bf16's precision."""
    bucket_elements: Optional[int] = None
    """ZeRO communication bucket size in elements (None = sized from the model, at most DeepSpeed's 5e8)."""
    timeout_s: float = 600.0
    """Process-group timeout: a collective that waits longer (a dead or hung peer) fails the run. It must exceed
    the longest time one process can spend between two collectives: a synchronous checkpoint save (each process
    writes its share, bytes / disk bandwidth) and, on resume, hashing the files a process reads (its share of the
    checkpoint; 1-2 GB/s per core). An asynchronous save writes between steps and is not bounded by it."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every this many steps (0 = off; see every_minutes)."""
    every_minutes: float = 15.0
    """Also save when this many minutes passed since the last save (0 = off)."""
    keep_last: int = 2
    """Keep this many most recent committed checkpoints that verify (older ones are deleted after a new commit;
    ones that do not verify are set aside as ``corrupt-step_N`` at the start of a run and never counted)."""
    resume_from: Optional[str] = "latest"
    """``latest``: continue from the newest committed checkpoint of run.dir if there is one (auto-resume);
    a checkpoint directory: continue from it; an object storage URL (``checkpoint.upload_to``'s, or its
    ``.../step_N``): download its newest checkpoint into run.dir and continue, unless run.dir has checkpoints of its
    own (then the newest of those); null: always start fresh (refused if run.dir has checkpoints)."""
    verify: bool = True
    """Check the sha256 of every checkpoint file this process reads against the commit manifest (each process
    checks only the files it reads, in parallel threads, before the first collective of the load)."""
    async_save: Union[bool, Literal["auto"]] = "auto"
    """Save in the background: at the step boundary the state is copied to host memory (pinned on CUDA), training
    goes on while a thread writes, hashes and fsyncs it, and the checkpoint is committed at a later step boundary
    once every process's writes are durable (at most one save in flight; stop signals and the end of the run wait
    for it). The price is a host copy of each process's share of the state. ``auto``: on with CUDA, off on the CPU."""
    upload_to: Optional[str] = None
    """Object storage URL (``s3://bucket/prefix``, any fsspec URL): each committed checkpoint is copied to
    ``URL/step_N`` in the background (marker last; failures logged, training goes on; remote copies are not
    pruned by keep_last). ``resume_from`` may name such a URL (see distllm/upload.py)."""
    storage_options: Optional[dict] = None
    """fsspec options for ``upload_to`` / a ``resume_from`` URL (``key``, ``secret``, ``client_kwargs:
    {endpoint_url: ...}``), like ``data.storage_options``; credentials are redacted wherever the config is
    written. Unset: the environment's credentials."""


@dataclass
class SFTConfig:
    """``distllm sft``: instruction fine-tuning with the same loop, checkpoints and launchers as ``train``."""

    init_from: Optional[str] = None
    """The pretrained model: a checkpoint directory, or a run directory (its newest committed checkpoint).
    Weights only: the optimizer, the schedule and the step start afresh. Its tokenizer (tokenizer.json in the
    checkpoint, or ``tokenizer.path`` if set, which must match) tokenizes the instructions, and the model section
    must describe its shape. A resumed SFT run continues from its own checkpoints, not from here. null: random
    initialisation, tokenizer from ``tokenizer.path`` or ``data.dir``."""
    data: str = "python-stdlib-docstrings"
    """Instructions: a ``.jsonl`` / ``.json`` / ``.parquet`` file or a directory of them, with chat ``messages``
    (role, content; multi-turn) or Alpaca ``instruction`` / ``input`` / ``output`` records; or
    ``python-stdlib-docstrings``: built from this Python's standard library (signature -> first paragraph of
    its docstring), on every machine."""
    chat_template: Optional[str] = None
    """Jinja chat template (the text, or a file holding it) that renders the conversations; null: the Alpaca
    format (``distllm.chat``). Each assistant turn must end with ``{{ eos_token }}``. Saved in every
    checkpoint; ``generate --chat`` and ``export`` use it."""
    packing: bool = True
    """Pack several examples into each sequence of ``data.seq_len`` (attention stays inside each example);
    false: one example per sequence, padded."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """An example longer than ``data.seq_len + 1`` tokens is cut (``truncate``) or left out (``drop``);
    both are counted in the log."""
    val_fraction: float = 0.05
    """About this fraction of the examples is held out (by a hash of each conversation) for validation:
    the response-only ``val_loss`` and the greedy answers."""
    max_examples: Optional[int] = None
    """Use at most this many examples of ``sft.data`` (null = all)."""
    eval_prompts: int = 8
    """Held-out prompts answered greedily at each evaluation, written with their reference answers to
    ``run.dir/answers/step_NNNNNN.jsonl`` (0 = none)."""
    max_new_tokens: int = 128
    """Longest greedy answer in tokens (generation stops earlier at the end-of-sequence token)."""


@dataclass
class DistillConfig:
    """``distllm distill``: train the student (``model``) on ``alpha * T**2 * D(teacher_T, student_T) +
    (1 - alpha) * cross-entropy`` (``distllm/distill.py``), in the same loop as ``distllm train``."""

    teacher: Optional[str] = None
    """The teacher: a distllm run directory (its newest committed checkpoint) or checkpoint directory, or a
    Hugging Face model directory (e.g. from ``distllm export``) with the student's tokenizer."""
    alpha: float = 0.5
    """Weight of the divergence; 1 - alpha weighs the cross-entropy on the data's labels."""
    temperature: float = 2.0
    """T: both distributions are softmax(logits / T) in the divergence (the cross-entropy stays at T = 1)."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """``forward_kl`` KL(teacher || student) (Hinton), ``reverse_kl`` KL(student || teacher), ``jsd`` GKD's
    generalized Jensen-Shannon divergence of weight ``beta``."""
    beta: float = 0.5
    """``jsd``'s beta: 0 = forward KL, 1 = reverse KL, 0.5 = the symmetric JSD."""
    topk_dir: Optional[str] = None
    """Offline distillation: read the teacher's top-k log-probabilities from this directory (written once by
    ``distllm distill-topk``) instead of running the teacher."""
    k: int = 64
    """``distill-topk``: how many of the teacher's most likely next tokens are stored per position."""
    data: Literal["tokens", "sft"] = "tokens"
    """What the student reads: ``tokens``, the prepared shards of ``data.dir`` (every token counts), or ``sft``,
    the instructions of the ``sft`` section (rendered and packed as ``distllm sft`` does; only response tokens
    count; ``sft.init_from`` starts the student)."""


TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class LoggingConfig:
    log_every: int = 10
    """Log a metrics line every this many steps."""
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers that receive every record of ``metrics.jsonl`` (step = the optimizer step) and the
    resolved config (credentials redacted) as the run's parameters, from the main process only:
    ``tensorboard`` (``run.dir/tensorboard``), ``wandb`` (``pip install 'distllm[wandb]'``; files in
    ``run.dir/wandb``; ``WANDB_MODE=offline`` works with no network, ``wandb sync run.dir/wandb/offline-run-*``
    uploads later), ``mlflow`` (``pip install 'distllm[mlflow]'``; see ``mlflow_tracking_uri``). A resumed run
    continues the same tracker runs (their ids are kept in ``run.dir/trackers.json`` and in checkpoints)
    without writing a step twice. A tracker that cannot start is one warning and training goes on without it
    (see ``trackers_required``)."""
    trackers_required: bool = False
    """Stop with an error, before training, when a tracker of ``trackers`` is not installed or cannot start
    (no login, unreachable server) instead of warning and training without it."""
    project: str = "distllm"
    """Tracker project: the W&B project, the MLflow experiment."""
    run_name: Optional[str] = None
    """Tracker run name (None = the name of ``run.dir``)."""
    mlflow_tracking_uri: Optional[str] = None
    """MLflow tracking server or store (None = ``MLFLOW_TRACKING_URI`` if set, else the local file store
    ``run.dir/mlruns``, which works with no network; browse it with ``mlflow ui --backend-store-uri
    run.dir/mlruns``)."""
    tensorboard: Optional[bool] = None
    """Older spelling kept for existing run files: ``false`` takes ``tensorboard`` out of ``trackers``, ``true``
    adds it; null: ``trackers`` alone decides."""
    progress: bool = True
    """Show a progress bar on the console."""
    trace_samples: bool = False
    """Write the global sample indices each process trained on, per step, to
    ``run.dir/samples/rank<R>.jsonl`` (to audit that no sample repeats or is skipped)."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s of one device for MFU (None = datasheet bf16 peak on known GPUs, measured
    fp32 matmul throughput on CPU)."""

    def tracker_names(self) -> list[str]:
        """``trackers`` without repeats, with the ``tensorboard`` switch applied."""
        names = [n for n in dict.fromkeys(self.trackers) if n != "tensorboard" or self.tensorboard is not False]
        if self.tensorboard and "tensorboard" not in names:
            names.insert(0, "tensorboard")
        return names


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, world_size: int = 1) -> "Config":
        validate(self, world_size)
        return self


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML run file (or the defaults if ``path`` is None), apply overrides, validate types."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(yaml_error(p, e)) from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must contain a mapping of sections, got {type(raw).__name__}")
    return from_dict(apply_overrides(raw, overrides))


def yaml_error(path: Path, e: yaml.YAMLError) -> str:
    """One line: ``FILE:LINE:COLUMN: not valid YAML: the problem (and where its construct began)``."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or problem is None:
        return f"config file {path} is not valid YAML: {' '.join(str(e).split())}"
    text = f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}"
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and start is not None:
        text += f" ({context} that starts at {start.line + 1}:{start.column + 1})"
    return text


def apply_overrides(raw: dict, overrides: list[str] = ()) -> dict:
    """``raw`` (a config as nested dicts) with ``--section.key=value`` overrides applied."""
    for item in overrides:
        section, key, value = parse_override(item)
        if raw.get(section) is None:  # absent, or an empty "section:" line in the YAML file
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ConfigError(f"section '{section}' must be a mapping")
        raw[section][key] = value
    return raw


def parse_override(item: str) -> tuple[str, str, Any]:
    """``--train.max_steps=10`` -> ("train", "max_steps", 10)."""
    text = item[2:] if item.startswith("--") else item
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override '{item}' must look like --section.key=value")
    dotted, value = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return section, key, parsed


def from_dict(raw: dict) -> Config:
    """A Config from nested dicts. Every unknown key and wrong type is reported at once, in one ConfigError,
    together with the value problems ``validate`` finds in the rest (the bad keys keep their defaults and
    are left out of those)."""
    cfg = Config()
    problems: list[str] = []
    bad: list[str] = []  # keys (or "section.") whose values were not taken
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for section, values in raw.items():
        if section not in sections:
            problems.append(f"unknown config section '{section}'{_suggest(section, sections)}")
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append(f"config section '{section}' must be a mapping of keys, got {values!r}")
            bad.append(f"{section}.")
            continue
        sub = getattr(cfg, section)
        hints = typing.get_type_hints(type(sub))
        names = {f.name for f in dataclasses.fields(sub)}
        for key, value in values.items():
            if key not in names:
                problems.append(f"unknown config key '{section}.{key}'{_suggest(key, names, section + '.')}")
                continue
            try:
                setattr(sub, key, _coerce(f"{section}.{key}", value, hints[key]))
            except ConfigError as e:
                problems.append(str(e))
                bad.append(f"{section}.{key}")
    if problems:
        problems += [p for p in find_problems(cfg) if not any(k in p for k in bad)]
        raise_problems(problems)
    return cfg


def _suggest(word: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int -> float, reject everything else."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        if typing.get_args(tp):  # dict[K, V]: check keys and values
            key_tp, value_tp = typing.get_args(tp)
            return {_coerce(f"{name} key", k, key_tp): _coerce(f"{name}[{k!r}]", v, value_tp) for k, v in value.items()}
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            example = f"[{value}]" if isinstance(value, str) else "[a, b]"
            raise ConfigError(f"{name} must be a list, e.g. {example}, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [v if item_tp is Any else _coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {name}")  # a bug, not a user error


# --------------------------------------------------------------------------- validation


def validate(cfg: Config, world_size: int = 1) -> None:
    """Check values and their combinations; one ConfigError naming every key to fix."""
    raise_problems(find_problems(cfg, world_size))


def raise_problems(problems: list[str]) -> None:
    """One ConfigError for all problems: the problem itself, or a count and one line per problem."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in problems))


def find_problems(cfg: Config, world_size: int = 1) -> list[str]:
    """Every problem of the values and their combinations, each naming the key to fix."""
    problems: list[str] = []
    positive = {
        "data.seq_len": cfg.data.seq_len,
        "run.lock_stale_minutes": cfg.run.lock_stale_minutes,
        **{f"data.mix[{k!r}]": w for k, w in (cfg.data.mix or {}).items()},
        "data.shard_tokens": cfg.data.shard_tokens,
        "data.tokenizer_sample_bytes": cfg.data.tokenizer_sample_bytes,
        "tokenizer.vocab_size": cfg.tokenizer.vocab_size,
        "tokenizer.min_frequency": cfg.tokenizer.min_frequency,
        "model.vocab_size": cfg.model.vocab_size,
        "model.n_layers": cfg.model.n_layers,
        "model.n_heads": cfg.model.n_heads,
        "model.d_model": cfg.model.d_model,
        "model.multiple_of": cfg.model.multiple_of,
        "model.max_seq_len": cfg.model.max_seq_len,
        "model.rope_theta": cfg.model.rope_theta,
        "model.norm_eps": cfg.model.norm_eps,
        "model.init_std": cfg.model.init_std,
        "optim.lr": cfg.optim.lr,
        "optim.eps": cfg.optim.eps,
        "train.max_steps": cfg.train.max_steps,
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.eval_batches": cfg.train.eval_batches,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "train.max_skipped_steps": cfg.train.max_skipped_steps,
        "distributed.timeout_s": cfg.distributed.timeout_s,
        "logging.log_every": cfg.logging.log_every,
    }
    optional_positive = {
        "model.n_kv_heads": cfg.model.n_kv_heads,
        "model.ffn_hidden": cfg.model.ffn_hidden,
        "data.max_documents": cfg.data.max_documents,
        "data.num_proc": cfg.data.num_proc,
        "logging.peak_flops": cfg.logging.peak_flops,
        "train.exit_at_step": cfg.train.exit_at_step,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "distributed.bucket_elements": cfg.distributed.bucket_elements,
    }
    non_negative = {
        "data.prefetch": cfg.data.prefetch,
        "data.storage_retries": cfg.data.storage_retries,
        "data.storage_backoff": cfg.data.storage_backoff,
        "data.read_ahead_shards": cfg.data.read_ahead_shards,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.grad_clip": cfg.optim.grad_clip,
        "train.eval_every": cfg.train.eval_every,
        "train.spike_factor": cfg.train.spike_factor,
        "checkpoint.every": cfg.checkpoint.every,
        "checkpoint.every_minutes": cfg.checkpoint.every_minutes,
    }
    for name, value in positive.items():
        if value <= 0:
            problems.append(f"{name} must be positive, got {value}")
    for name, value in optional_positive.items():
        if value is not None and value <= 0:
            problems.append(f"{name} must be positive (or null), got {value}")
    if cfg.data.mix is not None and not cfg.data.mix:
        problems.append("data.mix must name at least one data directory with a weight (or be null)")
    for name, value in non_negative.items():
        if value < 0:
            problems.append(f"{name} must be >= 0, got {value}")
    for name, value in {
        "data.val_fraction": cfg.data.val_fraction,
        "optim.decay_fraction": cfg.optim.decay_fraction,
    }.items():
        if not 0.0 < value < 1.0:
            problems.append(f"{name} must be between 0 and 1 (exclusive), got {value}")
    for name, value in {
        "optim.min_lr_ratio": cfg.optim.min_lr_ratio,
        "optim.beta1": cfg.optim.beta1,
        "optim.beta2": cfg.optim.beta2,
    }.items():
        if not 0.0 <= value <= 1.0:
            problems.append(f"{name} must be between 0 and 1, got {value}")

    m = cfg.model
    if m.d_model <= 0 or m.n_heads <= 0 or m.kv_heads <= 0:
        pass  # reported above; the shape checks below would divide by them
    elif m.d_model % m.n_heads:
        problems.append(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    elif m.head_dim % 2:
        problems.append(f"model.d_model / model.n_heads = {m.head_dim} must be even for rotary embeddings")
    if m.n_heads > 0 and m.kv_heads > 0 and m.n_heads % m.kv_heads:
        problems.append(f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.kv_heads})")
    if cfg.data.seq_len > m.max_seq_len:
        problems.append(f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    if cfg.tokenizer.path is None and m.vocab_size < cfg.tokenizer.vocab_size:
        problems.append(
            f"model.vocab_size ({m.vocab_size}) is smaller than tokenizer.vocab_size ({cfg.tokenizer.vocab_size})"
        )

    d = cfg.distributed
    if d.zero_stage is not None and d.zero_stage not in (0, 1, 2, 3):
        problems.append(f"distributed.zero_stage must be 0, 1, 2 or 3 (or null), got {d.zero_stage}")
    if d.offload_params != "none" and d.zero_stage not in (None, 3):
        problems.append(f"distributed.offload_params needs ZeRO stage 3, but distributed.zero_stage is {d.zero_stage}")
    checks = [lambda: check_resume_spec(cfg.checkpoint.resume_from), lambda: check_run_dir(cfg.run.dir)]
    problems.extend(f"train.eval_tasks names {p!r}, which is not a file" for p in cfg.train.eval_tasks
                    if not Path(p).is_file())
    if cfg.train.time_limit is not None:
        checks.append(lambda: parse_duration(cfg.train.time_limit, "train.time_limit"))
    for check in checks:
        try:
            check()
        except ConfigError as e:
            problems.append(str(e))
    if cfg.checkpoint.upload_to is not None and "://" not in cfg.checkpoint.upload_to:
        problems.append(f"checkpoint.upload_to must be an object storage URL like s3://bucket/prefix, got "
                        f"{cfg.checkpoint.upload_to!r} (null = no upload)")
    if not cfg.logging.project.strip():
        problems.append("logging.project must not be empty")
    if cfg.logging.run_name is not None and not cfg.logging.run_name.strip():
        problems.append("logging.run_name must not be empty (null = the name of run.dir)")

    problems.extend(sft_problems(cfg.sft))
    problems.extend(distill_problems(cfg.distill))

    t = cfg.train
    problems.extend(plan_problems(t.global_batch_size, t.micro_batch_size, world_size))
    if cfg.optim.warmup_steps >= t.max_steps:
        problems.append(
            f"optim.warmup_steps ({cfg.optim.warmup_steps}) must be smaller than train.max_steps ({t.max_steps})"
        )
    return problems


def sft_problems(s: SFTConfig) -> list[str]:
    """The ``sft`` section's problems (the chat template is compiled and checked here)."""
    problems = []
    if not 0.0 < s.val_fraction < 1.0:
        problems.append(f"sft.val_fraction must be between 0 and 1 (exclusive), got {s.val_fraction}")
    if s.max_examples is not None and s.max_examples <= 0:
        problems.append(f"sft.max_examples must be positive (or null), got {s.max_examples}")
    for name, value in {"sft.eval_prompts": s.eval_prompts, "sft.max_new_tokens": s.max_new_tokens}.items():
        if value < 0:
            problems.append(f"{name} must be >= 0, got {value}")
    if s.init_from is not None and ".." in Path(s.init_from).parts:
        problems.append(f"sft.init_from {s.init_from!r} contains '..'; give the checkpoint's absolute path instead")
    if s.data != "python-stdlib-docstrings" and not Path(s.data).expanduser().exists():
        problems.append(f"sft.data names {s.data!r}, which is neither a file, a directory nor python-stdlib-docstrings")
    if s.chat_template is not None:
        from distllm.chat import load_chat_template  # jinja2: only when a template is set

        try:
            load_chat_template(s.chat_template)
        except ConfigError as e:
            problems.append(str(e))
    return problems


def distill_problems(d: DistillConfig) -> list[str]:
    problems = [f"distill.{name} must be between 0 and 1, got {value}"
                for name, value in (("alpha", d.alpha), ("beta", d.beta)) if not 0.0 <= value <= 1.0]
    if d.temperature <= 0:
        problems.append(f"distill.temperature must be positive, got {d.temperature}")
    if d.k <= 0:
        problems.append(f"distill.k must be positive, got {d.k}")
    return problems


def parse_duration(text: str, name: str = "duration") -> float:
    """``"3:50:00"`` / ``"1-12:00:00"`` (Slurm style), ``"90m"``, ``"4h"``, ``"30s"`` or plain seconds -> seconds."""
    t = str(text).strip()
    try:
        if t[-1:] in "smhd" and t[-1:]:
            return float(t[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[t[-1]]
        days, _, clock = t.rpartition("-")
        parts = [float(x) for x in clock.split(":")]
        if not 1 <= len(parts) <= 3 or any(x < 0 for x in parts):
            raise ValueError
        seconds = 0.0
        for x in parts:  # SS, MM:SS or HH:MM:SS as Slurm reads them
            seconds = seconds * 60 + x
        return seconds + (float(days) * 86400 if days else 0.0)
    except (ValueError, IndexError):
        raise ConfigError(
            f"{name} must be a duration like '3:50:00', '90m', '4h' or '30s', got {text!r}"
        ) from None


def check_resume_spec(spec: str | None) -> None:
    """``checkpoint.resume_from`` may not climb out of a directory with ``..`` (use an absolute path)."""
    if spec is not None and ".." in Path(spec).parts:
        raise ConfigError(
            f"checkpoint.resume_from {spec!r} contains '..'; give the checkpoint's absolute path instead"
        )


def check_run_dir(run_dir: str) -> None:
    """``run.dir`` is a directory or can be made one: neither it nor a parent is a file."""
    for p in (Path(run_dir), *Path(run_dir).parents):
        if p.exists():
            if not p.is_dir():
                kind = "a file" if p.is_file() else "not a directory"
                what = f"is {kind}" if p == Path(run_dir) else f"cannot be created: {p} is {kind}"
                raise ConfigError(f"run.dir {run_dir} {what}; choose another --run.dir")
            return


def check_vocab(model_vocab_size: int, data_vocab_size: int, data_dir) -> None:
    """The model's embedding must have a row for every token id the data (its tokenizer) can hold."""
    if model_vocab_size < data_vocab_size:
        raise ConfigError(
            f"model.vocab_size ({model_vocab_size}) is smaller than the vocabulary the data in {data_dir} was made "
            f"with ({data_vocab_size}); set --model.vocab_size={_round_up(data_vocab_size, 64)}"
        )


def _round_up(x: int, multiple: int) -> int:
    return multiple * ((x + multiple - 1) // multiple)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML with credentials redacted (``distllm.redact``): the file is a record of the run,
    and run directories get copied, shared and uploaded."""
    Path(path).write_text(yaml.safe_dump(redacted_dict(cfg), sort_keys=False))


def redacted_dict(cfg: Config) -> dict:
    """``cfg.to_dict()`` with credentials redacted: what run.dir/config.yaml, checkpoints and trackers get."""
    return redact(cfg.to_dict())
