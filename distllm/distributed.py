"""The one place that talks to Accelerate, DeepSpeed and torch.distributed.

``setup(cfg)`` reads how the job was launched (one process, ``torchrun``, ``accelerate launch``,
Slurm) and returns a ``Runtime``; ``Runtime.parallelize(model, optimizer)`` applies everything that
is not model code: activation checkpointing, the data-parallel wrap (DDP or a DeepSpeed ZeRO engine)
and per-block ``torch.compile`` after the wrap. Model code stays single-device.

The training step is one contract that one process, DDP and ZeRO-1/2/3 all honour::

    for each of the `accum` micro-batches:
        with rt.accumulate(model):          # gradient sync only on the last micro-batch
            rt.backward(loss(model, batch)) # the engine scales by 1/accum
    grad_norm, applied = rt.optimizer_step(model, optimizer, max_norm)

DDP (and one process) clips and steps in ``optimizer_step``, after checking on every rank that the
global gradient norm is finite; DeepSpeed clips, checks and steps inside its engine at the
accumulation boundary (a non-finite norm makes it skip the step), and ``optimizer_step`` reads the
outcome. Either way a non-finite gradient on any rank is skipped by every rank alike, because the
norm is taken over the already all-reduced gradients.

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

from distllm import hostmem
from distllm.config import Config, TrainConfig
from distllm.errors import ConfigError

DEEPSPEED_DEFAULT_BUCKET = int(5e8)  # DeepSpeed's default bucket size in elements


@dataclass
class Runtime:
    accelerator: Any  # accelerate.Accelerator (imported lazily: it is slow to import)
    device: torch.device
    precision: str  # "fp32" | "bf16"
    rank: int
    world_size: int
    accum: int  # micro-batches per optimizer step on each process
    zero_stage: int | None = None  # None = DDP / one process
    ds_config: dict | None = field(default=None, repr=False)

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
            _share_fp32_partitions(model.optimizer)
        if self.deepspeed:
            self._init_zero_optimizer_state(model)
        if cfg.compile:  # per block, after the wrap: DDP's all-reduce hooks still overlap the backward
            for block in self.unwrap(model).layers:
                block.compile()
        return model, optimizer

    def _init_zero_optimizer_state(self, engine) -> None:  # after _share_fp32_partitions: state is keyed by them
        """Create AdamW's state (zeros, step 0: what AdamW itself creates at its first step) for every
        flat partition up front. DeepSpeed ZeRO-1/2 links each parameter to its slice of that state
        after the first step, but only for the parameter groups whose state exists by then (the first),
        so without this the moments of the second group (norm weights) could never be read or restored."""
        zero = engine.optimizer
        base = zero.optimizer  # the torch AdamW over this rank's flat fp32 partitions
        # ZeRO-3 hands its flat partitions to the base optimizer only during step(); ZeRO-1/2 keep them there
        flats = getattr(zero, "fp32_partitioned_groups_flat", None) or [p for g in base.param_groups for p in g["params"]]
        on_device = base.defaults.get("fused") or base.defaults.get("capturable")
        for flat in flats:
            st = base.state[flat]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu")
                st["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2 only
        if link is not None:
            link()  # what DeepSpeed runs after the first step, now that every group has state

    # ------------------------------------------------------------------ the step

    def accumulate(self, model):
        """Skip the gradient sync on all but the last of ``accum`` micro-batches (DDP and DeepSpeed alike)."""
        return self.accelerator.accumulate(model)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a micro-batch loss; the engine divides by ``accum`` (at the boundary DeepSpeed also steps)."""
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

    # ------------------------------------------------------------------ checkpoint state

    def _named_params(self, model) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.unwrap(model).named_parameters())  # shared (tied) tensors once, in a fixed order

    def owned_state(self, model, optimizer) -> tuple[dict, dict, int]:
        """(weights, AdamW moments, Adam step count) that this rank writes into a checkpoint: whole fp32
        tensors by parameter name. DDP / one process: rank 0 writes everything. ZeRO: the shards are
        gathered parameter by parameter (a collective) and parameter i is written by rank i % N."""
        params = self._named_params(model)
        weights: dict[str, torch.Tensor] = {}
        moments: dict[str, torch.Tensor] = {}
        if not self.deepspeed:
            step = 0
            if self.is_main:
                for name, p in params:
                    weights[name] = p.detach().to("cpu", torch.float32).contiguous()
                    st = optimizer.state.get(p, {})
                    if "exp_avg" in st:
                        moments[f"{name}.exp_avg"] = st["exp_avg"].detach().to("cpu").contiguous()
                        moments[f"{name}.exp_avg_sq"] = st["exp_avg_sq"].detach().to("cpu").contiguous()
                        step = int(st["step"])
            return weights, moments, step
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        base = model.optimizer.optimizer  # the torch AdamW over this rank's flat fp32 partitions
        step = next((int(st["step"]) for st in base.state.values() if "step" in st), 0)
        (has_state,) = self.any(step > 0)  # every rank takes the same branch: the gathers are collectives
        for i, (name, p) in enumerate(params):
            full = safe_get_full_fp32_param(p)
            m = safe_get_full_optimizer_state(p, "exp_avg") if has_state else None
            v = safe_get_full_optimizer_state(p, "exp_avg_sq") if has_state else None
            if i % self.world_size == self.rank:
                shape = tuple(getattr(p, "ds_shape", p.shape))
                weights[name] = full.detach().to("cpu").reshape(shape).contiguous()
                if has_state:
                    moments[f"{name}.exp_avg"] = m.detach().to("cpu").reshape(shape).contiguous()
                    moments[f"{name}.exp_avg_sq"] = v.detach().to("cpu").reshape(shape).contiguous()
        return weights, moments, step

    def load_training_state(self, model, optimizer, weights, moments, adam_step: int, path) -> None:
        """Set weights and AdamW state from a checkpoint's TensorReaders (any engine, any number of ranks)."""
        from distllm.checkpoint import check_names, check_shape, copy_weights

        params = self._named_params(model)
        check_names(path, {n for n, _ in params}, weights.keys())
        has_moments = bool(moments.keys())
        if not self.deepspeed:
            copy_weights(self.unwrap(model), weights, path)
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

        base = model.optimizer.optimizer  # the torch AdamW over this rank's flat fp32 partitions
        if has_moments:
            for st in base.state.values():  # created by _init_zero_optimizer_state
                st["step"].fill_(float(adam_step))
        for name, p in params:
            full = weights.get(name)
            check_shape(path, name, full.shape, getattr(p, "ds_shape", p.shape))  # ZeRO-3: the real shape
            full = full.to(self.device)
            safe_set_full_fp32_param(p, full)  # the fp32 master partition
            if has_moments:
                safe_set_full_optimizer_state(p, moments.get(f"{name}.exp_avg").to(self.device), "exp_avg")
                safe_set_full_optimizer_state(p, moments.get(f"{name}.exp_avg_sq").to(self.device), "exp_avg_sq")
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=self.zero_stage == 3):
                with torch.no_grad():
                    p.copy_(full)  # the working (module) copy; under ZeRO-3 re-partitioned on exit

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
    return Runtime(accelerator=None, device=torch.device(device), precision="fp32", rank=0, world_size=1, accum=1)


def launcher_world_size() -> int:
    """Processes in the job, from the launcher's environment (torchrun, accelerate launch, our Slurm script)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


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


def setup(cfg: Config) -> Runtime:
    """Read the launch environment, validate the config against it, and start the process group."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    t = cfg.train
    device_type = resolve_device(t.device).type
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed (imported by Accelerate) would probe for GPUs
        hostmem.set_mmap_threshold()  # before the model is built: freed tensors leave the RSS
    if t.debug:
        os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")  # CUDA errors at the op that caused them
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    world_size = launcher_world_size()
    cfg.validate(world_size=world_size)  # before any process group exists: a bad config never hangs a job
    if t.debug and world_size > 1:
        raise ConfigError(f"train.debug runs on one process, but this job has {world_size}; launch it without torchrun")
    precision = resolve_precision(t, device_type)
    accum = t.global_batch_size // (t.micro_batch_size * world_size)

    zero_stage, ds_config, plugin = deepspeed_settings(cfg, world_size, accum, precision)
    kwargs = dict(
        # cpu=True makes Accelerate drop a DeepSpeed plugin (MULTI_CPU DDP); DeepSpeed finds the CPU by itself
        cpu=device_type == "cpu" and plugin is None,
        mixed_precision="bf16" if precision == "bf16" else "no",
        gradient_accumulation_steps=accum,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))],
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
    if t.debug:
        torch.autograd.set_detect_anomaly(True)
        torch.use_deterministic_algorithms(True, warn_only=True)
    return Runtime(accelerator, accelerator.device, precision, rank, world, accum, zero_stage, ds_config)


# ---------------------------------------------------------------------------- DeepSpeed


def deepspeed_settings(cfg: Config, world_size: int, accum: int, precision: str):
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
            ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", accum, "gradient_accumulation_steps"),
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

    ds = build_deepspeed_config(cfg, world_size, accum, precision, stage, offload_opt, offload_par)
    ds = merge_user_config(ds, user, user_file)
    from accelerate.utils import DeepSpeedPlugin

    # The accelerate config's DeepSpeed fields were read (and checked against ours) above; Accelerate
    # would refuse them next to a full config (ACCELERATE_CONFIG_DS_FIELDS lists them).
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    plugin = DeepSpeedPlugin(
        hf_ds_config=ds,
        gradient_accumulation_steps=accum,
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
    if cfg.distributed.bucket_elements:
        return cfg.distributed.bucket_elements
    from distllm.model import count_params

    return int(min(DEEPSPEED_DEFAULT_BUCKET, max(cfg.model.d_model**2, count_params(cfg.model) // 8)))


def build_deepspeed_config(cfg: Config, world_size: int, accum: int, precision: str, stage: int,
                           offload_optimizer: str = "none", offload_params: str = "none") -> dict:
    """The DeepSpeed config that expresses the distllm config (see DeepSpeed's config-json docs)."""
    t = cfg.train
    bucket = bucket_elements(cfg)
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": False,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": bucket,
            "stage3_param_persistence_threshold": 10 * cfg.model.d_model,  # norms stay whole on every rank
            "stage3_max_live_parameters": bucket,
            "stage3_max_reuse_distance": bucket,
            "stage3_gather_16bit_weights_on_model_save": False,  # distllm gathers fp32 weights itself
        })
    if offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": offload_optimizer, "pin_memory": torch.cuda.is_available()}
    if offload_params != "none":
        zero["offload_param"] = {"device": offload_params, "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # distllm's AdamW (torch's fused kernel)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


# keys distllm owns: (path in the DeepSpeed JSON, the distllm key that sets it)
OWNED_KEYS = (
    (("train_batch_size",), "train.global_batch_size"),
    (("train_micro_batch_size_per_gpu",), "train.micro_batch_size"),
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


def _share_fp32_partitions(zero) -> None:
    """ZeRO-3: let the optimizer step the fp32 parameter partitions themselves instead of a copy of them.

    DeepSpeed means to skip its fp32 master copy when a partition is already fp32 on the optimizer's
    device (stage3.py ``_create_fp32_partitions``: "we don't need another copy of the weights"), but it
    compares ``tensor.device`` with the string ``current_device_name()`` ('cpu', 'cuda:0'), and a
    ``torch.device`` never equals a string, so 0.19 keeps a clone: 4 bytes per parameter / world size
    per rank, a fifth of the ZeRO-3 state in fp32 (4 + 4 + 4 + 8 bytes per parameter). Do what that
    branch does. Under bf16 the partitions are bf16 and the fp32 master copy stays, as it must;
    offloaded or swapped partitions are left alone.
    """
    if zero.offload_optimizer or getattr(zero, "swap_optimizer", False):
        return
    fp32 = zero.fp32_partitioned_groups_flat
    for i, (params, master) in enumerate(zip(zero.fp16_partitioned_groups_flat, fp32)):
        if params is None or params.dtype != master.dtype or params.device != master.device:
            continue
        if master.data_ptr() == params.data_ptr() or master in zero.optimizer.state:
            continue
        # nothing has stepped yet, so the copy must still be a copy; compared as bits because the last
        # rank's padding is uninitialised memory, which may hold NaNs
        if not torch.equal(params.view(torch.uint8), master.view(torch.uint8)):
            raise RuntimeError(f"ZeRO-3 fp32 partition {i} differs from its parameters before the first step")
        params.ds_id = master.ds_id
        params.requires_grad = True  # as DeepSpeed sets on its fp32 partitions
        fp32[i] = params
