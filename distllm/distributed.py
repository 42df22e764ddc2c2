"""The one place that talks to Accelerate, DeepSpeed and torch.distributed.

``setup(cfg)`` reads how the job was launched (one process, ``torchrun``, ``accelerate launch``,
Slurm), validates the config against it, builds the ``BatchPlan`` and returns a ``Runtime``;
``Runtime.parallelize(model, optimizer)`` applies everything that is not model code: activation
checkpointing, the data-parallel wrap (DDP or a DeepSpeed ZeRO engine) and per-block
``torch.compile`` after the wrap. Model code stays single-device. DeepSpeed's private attributes
are used only through ``deepspeed_fence``.

The training step is one contract that one process, DDP and ZeRO-1/2/3 all honour::

    step_tokens = rt.sum(counted tokens of this rank's micro-batches)  # all ranks, once per step
    for each of the plan's `accum` micro-batches:
        with rt.accumulate(model):                 # gradient sync only on the last micro-batch
            rt.backward(loss_sum, step_tokens)     # d(sum over the whole step / step_tokens)
    grad_norm, applied = rt.optimizer_step(model, optimizer, max_norm)

``backward`` undoes the engines' own averaging (1/accum for accumulation, 1/world for the
all-reduce), so the gradient is exactly that of the step's summed token loss divided by the step's
counted tokens, however they fall across micro-batches and processes (DESIGN.md, "Loss
normalization"). DDP (and one process) clips and steps in ``optimizer_step`` after checking on every
rank that the global gradient norm is finite; DeepSpeed clips, checks and steps inside its engine at
the accumulation boundary (a non-finite norm makes it skip the step), and ``optimizer_step`` reads
the outcome. Either way a non-finite gradient on any rank is skipped by every rank alike, because
the norm is taken over the already all-reduced gradients.

Batch sizes, accumulation, clipping and precision go to DeepSpeed from the distllm config
(``deepspeed_config``); a user's DeepSpeed JSON or ``accelerate`` config that disagrees is an
error naming both values. Rank and world size come from torch.distributed (Accelerate's counters
disagree under DeepSpeed on CPU), or from the launcher's environment before it is initialised.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distllm import deepspeed_fence, hostmem
from distllm.batch_plan import BatchPlan, launcher_world_size
from distllm.config import Config, TrainConfig
from distllm.errors import ConfigError
from distllm.model.kernels import enable_tf32_matmuls

DEEPSPEED_DEFAULT_BUCKET = int(5e8)  # DeepSpeed's default bucket size in elements


@dataclass
class Runtime:
    accelerator: Any  # accelerate.Accelerator (imported lazily: it is slow to import)
    device: torch.device
    precision: str  # "fp32" | "bf16"
    rank: int
    world_size: int
    plan: BatchPlan
    zero_stage: int | None = None  # None = DDP / one process
    ds_config: dict | None = field(default=None, repr=False)

    @property
    def accum(self) -> int:
        """Micro-batches per optimizer step on each process."""
        return self.plan.accum

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage is not None

    @property
    def engine_name(self) -> str:
        if self.deepspeed:
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        return "DDP" if self.world_size > 1 else "single process"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matmuls run in (for the MFU peak)."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    # ------------------------------------------------------------------ building the model

    def init_context(self):
        """Context to build the model in: under ZeRO-3 ``deepspeed.zero.Init`` partitions every
        parameter as soon as its module is constructed, so no rank ever holds the whole model."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        # no dtype argument: DeepSpeed 0.19 turns any explicit one into bf16 on CPU (an operator-precedence
        # slip in Init._set_dtype); from the config it takes fp32, or bf16 when bf16 is enabled
        return deepspeed.zero.Init(config_dict_or_path=self.ds_config)

    def parallelize(self, model: torch.nn.Module, optimizer, cfg: TrainConfig):
        """Wrap a single-device model and its optimizer for this runtime."""
        model.activation_checkpointing = cfg.activation_checkpointing
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if self.zero_stage == 3:
            deepspeed_fence.share_fp32_partitions(model)
        if self.deepspeed:
            deepspeed_fence.init_optimizer_state(model)  # after sharing: the state is keyed by the partitions
        if cfg.compile:  # per block, after the wrap: DDP's all-reduce hooks still overlap the backward
            for block in self.unwrap(model).layers:
                block.compile()
        return model, optimizer

    def describe(self, model) -> str:
        """The engine and its precision for the run's first log line, e.g. 'DeepSpeed ZeRO-2 (bf16, gradients
        accumulated in fp32)'."""
        text = f"{self.engine_name} ({self.precision}"
        if self.deepspeed:
            accum = str(deepspeed_fence.grad_accum_dtype(model)).removeprefix("torch.").replace("float", "fp")
            text += f", gradients accumulated in {accum}"
        return text + ")"

    # ------------------------------------------------------------------ the step

    def accumulate(self, model):
        """Skip the gradient sync on all but the last of ``accum`` micro-batches (DDP and DeepSpeed alike)."""
        return self.accelerator.accumulate(model)

    def backward(self, loss: torch.Tensor, step_tokens: torch.Tensor | float | None = None) -> None:
        """Backward of a micro-batch's summed token loss, as a part of the whole step's mean.

        ``step_tokens``: the tokens counted in the whole optimizer step, over every micro-batch and
        every process. The engine divides by ``accum`` (Accelerate and DeepSpeed alike) and averages
        over processes, so the loss is scaled by accum x world / step_tokens first; at the
        accumulation boundary DeepSpeed also steps. Without ``step_tokens``, ``loss`` is a
        micro-batch mean and only the engine's averaging applies (benchmarks)."""
        if step_tokens is not None:
            loss = loss * (self.accum * self.world_size / step_tokens)
        self.accelerator.backward(loss)

    def optimizer_step(self, model, optimizer, max_norm: float) -> tuple[torch.Tensor, bool]:
        """After the last micro-batch: clip to ``max_norm`` (0 = off) and step unless the global gradient
        norm is non-finite. Returns (norm before clipping, whether the step was applied), equal on every rank."""
        if self.deepspeed:  # the engine already clipped, checked and stepped in backward()
            norm = model.get_global_grad_norm()
            norm = torch.tensor(float("nan") if norm is None else float(norm))
            return norm, bool(model.was_step_applied())
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
        # the step's one host sync: gradients are all-reduced, so every rank takes the same decision
        applied = bool(torch.isfinite(norm))
        if applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm.detach(), applied

    # ------------------------------------------------------------------ collectives

    def unwrap(self, model) -> torch.nn.Module:
        if self.accelerator is not None:
            model = self.accelerator.unwrap_model(model)
        return getattr(model, "_orig_mod", model)  # a torch.compile wrapper

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a tensor over processes."""
        if self.world_size == 1:
            return value
        value = value.detach().to(self.device, copy=True)
        torch.distributed.all_reduce(value)
        return value / self.world_size

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        value = value.detach().to(self.device, copy=True)
        torch.distributed.all_reduce(value)
        return value

    def any(self, *flags: bool) -> list[bool]:
        """For each flag: is it set on any process? (One small all-reduce.)"""
        if self.world_size == 1:
            return [bool(f) for f in flags]
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return [bool(x) for x in t.tolist()]

    def gather_object(self, obj) -> list:
        """``obj`` of every rank, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


# ---------------------------------------------------------------------------- setup


def resolve_device(name: str) -> torch.device:
    """``train.device`` -> a torch device: ``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA GPU is available (use --train.device=cpu)")
    return torch.device(name)


def local_runtime(device: str = "cpu") -> Runtime:
    """One process without Accelerate or a process group (tools and unit tests): checkpoints save and load alike."""
    return Runtime(accelerator=None, device=torch.device(device), precision="fp32", rank=0, world_size=1,
                   plan=BatchPlan(1, 1))


def resolve_precision(cfg: TrainConfig, device_type: str) -> str:
    precision = cfg.precision
    if precision == "auto":
        bf16_ok = device_type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16_ok else "fp32"  # CPU bf16 matmul is far slower than fp32
    if precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision is 'bf16' but this GPU does not support bfloat16 (use fp32)")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # set by `accelerate launch`
    if launcher != "no" and launcher != precision:
        raise ConfigError(
            f"the accelerate config sets mixed_precision: {launcher}, but train.precision resolves to {precision}; "
            "set train.precision in the distllm config and leave mixed_precision out of the accelerate config"
        )
    return precision


@contextlib.contextmanager
def debug_checks():
    """``train.debug``'s checks for the duration of a run, then everything as it was (a notebook or a test
    that runs a debug run and then a real one in the same process must not keep paying for them):
    synchronous CUDA errors at the op that caused them, deterministic cuBLAS and algorithms, autograd's
    anomaly detection (the op whose backward produced a NaN)."""
    env = {"CUDA_LAUNCH_BLOCKING": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    saved_env = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    anomaly, deterministic = torch.is_anomaly_enabled(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.autograd.set_detect_anomaly(True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.autograd.set_detect_anomaly(anomaly)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def setup(cfg: Config) -> Runtime:
    """Read the launch environment, validate the config against it, and start the process group."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    t = cfg.train
    device_type = resolve_device(t.device).type
    enable_tf32_matmuls(device_type)  # fp32 matmuls on tensor cores (CUDA only)
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed (imported by Accelerate) would probe for GPUs
        hostmem.set_mmap_threshold()  # before the model is built: freed tensors leave the RSS
    world_size = launcher_world_size()
    cfg.validate(world_size=world_size)  # before any process group exists: a bad config never hangs a job
    if t.debug and world_size > 1:
        raise ConfigError(f"train.debug runs on one process, but this job has {world_size}; launch it without torchrun")
    precision = resolve_precision(t, device_type)
    plan = BatchPlan.build(t.global_batch_size, t.micro_batch_size, world_size)

    zero_stage, ds_config, plugin = deepspeed_settings(cfg, plan, precision, device_type)
    kwargs = dict(
        # cpu=True makes Accelerate drop a DeepSpeed plugin (MULTI_CPU DDP); DeepSpeed finds the CPU by itself
        cpu=device_type == "cpu" and plugin is None,
        mixed_precision="bf16" if precision == "bf16" else "no",
        gradient_accumulation_steps=plan.accum,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s)),
            # DDP: gradients live in the all-reduce buckets (no second gradient-sized copy); the only
            # buffers are the RoPE tables, constants built alike on every rank, so none is broadcast
            DistributedDataParallelKwargs(gradient_as_bucket_view=True, broadcast_buffers=False),
        ],
    )
    if plugin is not None:
        kwargs["deepspeed_plugin"] = plugin
    accelerator = Accelerator(**kwargs)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = accelerator.process_index, accelerator.num_processes
    if world != world_size:
        raise ConfigError(f"the launcher says WORLD_SIZE={world_size} but the process group has {world} processes")
    return Runtime(accelerator, accelerator.device, precision, rank, world, plan, zero_stage, ds_config)


# ---------------------------------------------------------------------------- DeepSpeed


def deepspeed_settings(cfg: Config, plan: BatchPlan, precision: str, device_type: str = "cpu"):
    """(zero stage or None, DeepSpeed config dict or None, Accelerate DeepSpeedPlugin or None).

    The stage and offload come from the distllm config or from ``accelerate launch`` (its DeepSpeed
    config); everything the training loop owns (batch sizes, accumulation, clipping, precision) comes
    from the distllm config. Values set elsewhere that disagree are an error naming both.
    """
    d = cfg.distributed
    stage, offload_opt, offload_par = d.zero_stage, d.offload_optimizer, d.offload_params
    launcher_file = None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        env_stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        launcher_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        launcher_file = None if launcher_file == "none" else launcher_file
        if launcher_file is None:
            if stage is not None and stage != env_stage:
                raise ConfigError(
                    f"distributed.zero_stage is {stage} but the accelerate config sets zero_stage: {env_stage}"
                )
            stage = env_stage
            offload_opt = _agree("distributed.offload_optimizer", offload_opt,
                                 os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"),
                                 "offload_optimizer_device")
            offload_par = _agree("distributed.offload_params", offload_par,
                                 os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none"),
                                 "offload_param_device")
        for env, ours, name in (
            ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", plan.accum, "gradient_accumulation_steps"),
            ("ACCELERATE_GRADIENT_CLIPPING", cfg.optim.grad_clip, "gradient_clipping"),
        ):
            value = os.environ.get(env, "auto")
            if value not in ("auto", "none", "") and float(value) != float(ours):
                raise ConfigError(
                    f"the accelerate config sets {name}: {value}, but the distllm config gives {ours}; "
                    "leave it out of the accelerate config (distllm hands it to DeepSpeed)"
                )
    user_file = d.deepspeed_config or launcher_file
    user = _read_json(user_file) if user_file else {}
    if user and stage is None:
        stage = user.get("zero_optimization", {}).get("stage", 0)
    if stage is None:
        return None, None, None
    deepspeed_fence.check_version()

    ds = build_deepspeed_config(cfg, plan, precision, stage, offload_opt, offload_par, device_type)
    ds = merge_user_config(ds, user, user_file)
    from accelerate.utils import DeepSpeedPlugin

    # The accelerate config's DeepSpeed fields were read (and checked against ours) above; Accelerate
    # would refuse them next to a full config (ACCELERATE_CONFIG_DS_FIELDS lists them).
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    plugin = DeepSpeedPlugin(
        hf_ds_config=ds,
        gradient_accumulation_steps=plan.accum,
        gradient_clipping=cfg.optim.grad_clip,
        zero_stage=stage,
        offload_optimizer_device=ds["zero_optimization"].get("offload_optimizer", {}).get("device", "none"),
        offload_param_device=ds["zero_optimization"].get("offload_param", {}).get("device", "none"),
        zero3_init_flag=False,  # distllm builds the model under zero.Init itself (Runtime.init_context)
    )
    return stage, ds, plugin


def _agree(name: str, ours: str, launcher: str, launcher_name: str) -> str:
    if ours != "none" and launcher not in ("none", ours):
        raise ConfigError(f"{name} is {ours} but the accelerate config sets {launcher_name}: {launcher}")
    return ours if ours != "none" else launcher


def _read_json(path: str) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config not found: {p}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"DeepSpeed config {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {p} must hold a JSON object")
    return data


def bucket_elements(cfg: Config) -> int:
    """Communication bucket size: DeepSpeed's 5e8-element default dominates memory at small scale,
    so a bucket is sized from the model: 1/8 of its parameters, at least d_model^2, at most 5e8."""
    return cfg.distributed.bucket_elements or model_bucket(cfg.model)


def model_bucket(model_cfg) -> int:
    """1/8 of the model's parameters, at least d_model^2, at most DeepSpeed's default (``bucket_elements``)."""
    from distllm.model import count_params

    return int(min(DEEPSPEED_DEFAULT_BUCKET, max(model_cfg.d_model**2, count_params(model_cfg) // 8)))


def zero3_sizes(model_cfg, bucket: int) -> dict[str, int]:
    """ZeRO-3's gathering sizes for a model: buckets of ``bucket`` elements; parameters up to ten rows of
    d_model (the norms) stay whole on every rank."""
    return {"stage3_prefetch_bucket_size": bucket, "stage3_param_persistence_threshold": 10 * model_cfg.d_model,
            "stage3_max_live_parameters": bucket, "stage3_max_reuse_distance": bucket}


def build_deepspeed_config(cfg: Config, plan: BatchPlan, precision: str, stage: int,
                           offload_optimizer: str = "none", offload_params: str = "none",
                           device_type: str = "cpu") -> dict:
    """The DeepSpeed config that expresses the distllm config (see DeepSpeed's config-json docs)."""
    bucket = bucket_elements(cfg)
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        # overlap the gradient reduction with the backward on GPUs (CUDA streams); on CPU there is
        # nothing to overlap with and gloo runs it synchronously
        "overlap_comm": device_type == "cuda",
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if stage == 3:
        zero.update(zero3_sizes(cfg.model, bucket))
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # distllm writes its fp32 partitions itself
    if offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": offload_optimizer, "pin_memory": torch.cuda.is_available()}
    if offload_params != "none":
        zero["offload_param"] = {"device": offload_params, "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        # gradients accumulate over micro-batches in fp32 by default, as under DDP with autocast (DeepSpeed's
        # default is the model dtype: bf16); 0.19 honours it in every stage (ZeRO-1 through its BF16_Optimizer)
        "data_types": {"grad_accum_dtype": cfg.distributed.grad_accum_dtype},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # distllm's AdamW (torch's fused kernel)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


# keys distllm owns: (path in the DeepSpeed JSON, the distllm key that sets it)
OWNED_KEYS = (
    (("train_batch_size",), "train.global_batch_size"),
    (("train_micro_batch_size_per_gpu",), "train.micro_batch_size (or the micro-batch derived from it)"),
    (("gradient_accumulation_steps",), "train.global_batch_size / (micro_batch_size x processes)"),
    (("gradient_clipping",), "optim.grad_clip"),
    (("bf16", "enabled"), "train.precision"),
    (("fp16", "enabled"), "train.precision (distllm trains in fp32 or bf16)"),
    (("zero_optimization", "stage"), "distributed.zero_stage"),
)


def merge_user_config(ours: dict, user: dict, source: str | None) -> dict:
    """``ours`` with the user's other settings merged in; a disagreeing owned value is a ConfigError."""
    if not user:
        return ours
    for path, key in OWNED_KEYS:
        theirs, mine = _get(user, path), _get(ours, path)
        if theirs is None or theirs == "auto":
            continue
        same = (float(theirs) == float(mine)) if isinstance(mine, (int, float)) and not isinstance(mine, bool) \
            else theirs == mine
        if not same:
            raise ConfigError(
                f"DeepSpeed config {source} sets {'.'.join(path)} = {theirs}, but the distllm config gives {mine} "
                f"({key}); remove it from the JSON or set it to \"auto\""
            )
    merged = json.loads(json.dumps(ours))
    for k, v in user.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            for k2, v2 in v.items():
                if v2 != "auto":
                    merged[k][k2] = v2
        elif v != "auto" and k not in merged:
            merged[k] = v
    return merged


def _get(d: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d
