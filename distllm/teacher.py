"""The distillation teacher: a frozen model that scores the student's batch.

``load_teacher(spec, rt, ...)`` takes ``distill.teacher``:

* a distllm run directory (its newest committed checkpoint) or checkpoint directory: the model is
  built from the config saved in the checkpoint and its weights loaded strictly;
* a Hugging Face model directory (``config.json`` + weights + ``tokenizer.json``, e.g. one written by
  ``distllm export``): ``transformers.AutoModelForCausalLM``.

Either way the teacher must have been trained with the student's tokenizer (the same ``tokenizer.json``
fingerprint) and have as many vocabulary rows as the student; otherwise a ConfigError names both.

Where it lives: under one process or DDP, a plain module on the device in eval mode with
``requires_grad`` off, never wrapped by the engine (no gradients, no all-reduce) and never part of a
checkpoint. Under ZeRO-3 a distllm teacher is built inside ``deepspeed.zero.Init`` like the student, so
each rank holds 1/world of its parameters from the start, and DeepSpeed's parameter manager for a model
without an optimizer (``deepspeed.initialize`` with no optimizer: ZeRO-Inference) gathers each layer
around its forward: a teacher larger than one device fits. Its forward runs under ``torch.no_grad`` (and
bf16 autocast when the run is bf16) and returns logits (B, T, V) in the compute dtype.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from distllm import checkpoint
from distllm.errors import ConfigError

HF_CONFIG = "config.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class Teacher:
    """``teacher(input_ids (B, T), doc_ids (B, T) or None) -> logits (B, T, V)``, without gradients."""

    module: torch.nn.Module  # the module the forward runs (a DeepSpeed engine under ZeRO-3)
    kind: str  # "distllm" | "hf"
    source: str  # the checkpoint or model directory
    num_params: int
    local_params: int  # parameter elements this rank holds (fewer than num_params when partitioned)
    autocast: torch.dtype | None = None

    def __call__(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        device_type = input_ids.device.type
        with torch.no_grad(), torch.autocast(device_type, dtype=self.autocast or torch.float32,
                                             enabled=self.autocast is not None):
            if self.kind == "hf":
                if doc_ids is not None:  # a transformers model has no packed-document mask of ours
                    raise ConfigError("data.document_mask needs a distllm teacher (a Hugging Face teacher attends "
                                      "across packed documents); set --data.document_mask=false")
                return self.module(input_ids=input_ids, use_cache=False).logits
            return self.module(input_ids, doc_ids=doc_ids)

    def describe(self, world_size: int) -> str:
        where = (f"partitioned: this rank holds {self.local_params:,} of {self.num_params:,} parameters"
                 if self.local_params < self.num_params else f"whole on each of {world_size} process(es)")
        return f"teacher {self.source} ({self.kind}, {self.num_params / 1e6:.2f}M params, {where})"


def load_teacher(spec: str, rt, student_fingerprint: str, student_vocab: int, student_tokenizer: str) -> Teacher:
    """The frozen teacher named by ``distill.teacher`` (see the module doc)."""
    path = Path(spec)
    if (path / HF_CONFIG).is_file() and not (path / checkpoint.MARKER).exists():
        teacher = _hf_teacher(path, rt, student_fingerprint, student_vocab, student_tokenizer)
    else:
        teacher = _distllm_teacher(path, rt, student_fingerprint, student_vocab, student_tokenizer)
    teacher.autocast = torch.bfloat16 if rt.precision == "bf16" else None
    return teacher


def _refuse_tokenizer(teacher_src: str, teacher_tok: str, teacher_fp: str, student_tok: str, student_fp: str):
    raise ConfigError(
        f"distill.teacher {teacher_src} uses another tokenizer than the student: {teacher_tok} (fingerprint "
        f"{teacher_fp[:12]}) vs {student_tok} (fingerprint {student_fp[:12]}); distillation needs the same tokenizer")


def _check_vocab(src: str, teacher_vocab: int, student_vocab: int) -> None:
    if teacher_vocab != student_vocab:
        raise ConfigError(f"distill.teacher {src} has {teacher_vocab} vocabulary rows, the student (model.vocab_size) "
                          f"{student_vocab}; set model.vocab_size={teacher_vocab}")


def _distllm_teacher(path: Path, rt, student_fp: str, student_vocab: int, student_tok: str) -> Teacher:
    from distllm.config import from_dict
    from distllm.model import Transformer

    ckpt = checkpoint.locate(path)  # CheckpointError (one line) for a directory with nothing committed
    state = checkpoint.read_state(ckpt)
    teacher_fp = state.get("tokenizer_fingerprint", "")
    if teacher_fp != student_fp:
        tok = ckpt / TOKENIZER_FILE
        _refuse_tokenizer(str(ckpt), str(tok if tok.is_file() else ckpt), teacher_fp or "unknown",
                          student_tok, student_fp)
    try:
        mcfg = from_dict({"model": (state.get("config") or {}).get("model") or {}}).model
    except ConfigError as e:
        raise ConfigError(f"distill.teacher {ckpt}: its saved model config is unusable ({e})") from None
    _check_vocab(str(ckpt), mcfg.vocab_size, student_vocab)

    if rt.zero_stage == 3:
        import deepspeed

        ds_config = teacher_ds_config(rt.ds_config, mcfg)
        with deepspeed.zero.Init(config_dict_or_path=ds_config):  # partitioned as it is built
            model = Transformer(mcfg)
        _load_partitioned(ckpt, model, rt)
        model.eval().requires_grad_(False)
        local = sum(_local_numel(p) for p in model.parameters())
        total = sum(_full_numel(p) for p in model.parameters())
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)  # no optimizer: parameter gathering only
        engine.eval()
        return Teacher(engine, "distllm", str(ckpt), total, local)
    model = Transformer(mcfg)
    checkpoint.load_weights(ckpt, model)
    model = model.to(rt.device).eval().requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    return Teacher(model, "distllm", str(ckpt), n, n)


def teacher_ds_config(student: dict, mcfg) -> dict:
    """The student's DeepSpeed config with the ZeRO-3 sizes of the teacher (small parameters, up to ten
    rows of d_model, stay whole on every rank)."""
    from distllm.distributed import model_bucket, zero3_sizes

    ds = copy.deepcopy(student)
    ds["zero_optimization"].update(zero3_sizes(mcfg, model_bucket(mcfg)))
    for key in ("offload_optimizer",):  # no optimizer
        ds["zero_optimization"].pop(key, None)
    return ds


def _load_partitioned(ckpt: Path, model: torch.nn.Module, rt) -> None:
    """Strictly load a checkpoint into a ZeRO-3-partitioned model: one parameter gathered at a time, rank 0
    writes it, DeepSpeed partitions it again."""
    import deepspeed

    reader = checkpoint.TensorReader(ckpt)  # whole tensors from the pieces the manifest indexes
    params = dict(model.named_parameters())
    checkpoint.check_names(ckpt, set(params), reader.keys())
    for name, p in params.items():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if rt.is_main:
                t = reader.get(name)
                checkpoint.check_shape(ckpt, name, t.shape, p.shape)
                with torch.no_grad():
                    p.copy_(t)


def _local_numel(p: torch.nn.Parameter) -> int:
    ds = getattr(p, "ds_tensor", None)
    return p.numel() if ds is None else ds.ds_numel if hasattr(ds, "ds_numel") else ds.numel()


def _full_numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())


def _hf_teacher(path: Path, rt, student_fp: str, student_vocab: int, student_tok: str) -> Teacher:
    from distllm.tokenizer import fingerprint, load_tokenizer

    tok = path / TOKENIZER_FILE
    if not tok.is_file():
        raise ConfigError(f"distill.teacher {path} has no {TOKENIZER_FILE}, so its tokenizer cannot be checked "
                          f"against the student's ({student_tok})")
    teacher_fp = fingerprint(load_tokenizer(tok))
    if teacher_fp != student_fp:
        _refuse_tokenizer(str(path), str(tok), teacher_fp, student_tok, student_fp)
    try:
        vocab = int(json.loads((path / HF_CONFIG).read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"distill.teacher {path}/{HF_CONFIG} has no readable vocab_size ({e})") from None
    _check_vocab(str(path), vocab, student_vocab)
    if rt.zero_stage == 3:
        raise ConfigError("a Hugging Face distill.teacher is not partitioned under ZeRO-3; use the distllm checkpoint "
                          "it was exported from, or distributed.zero_stage <= 2")
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if rt.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model = model.to(rt.device).eval().requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    return Teacher(model, "hf", str(path), n, n)
