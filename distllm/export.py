"""``distllm export TARGET --out DIR``: a checkpoint as a Hugging Face Llama model directory.

``TARGET`` is a run directory (its newest committed checkpoint is exported) or a checkpoint
directory. ``DIR`` receives what ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` load with no custom code:

    config.json                  LlamaConfig of the checkpoint's model section
    generation_config.json       <|endoftext|> as bos / eos / pad token
    model.safetensors            weights under HF names (or model-0000i-of-0000N.safetensors shards
                                 of at most --max-shard-gb each, with model.safetensors.index.json)
    tokenizer.json               the run's byte-level BPE, as trained
    tokenizer_config.json        PreTrainedTokenizerFast, special tokens, split_special_tokens, and the
                                 chat template (``chat_template``, see distllm/chat.py)
    special_tokens_map.json

The weights are a plain split of the fused ones (see the mapping at the top of
``distllm/model/transformer.py``): wqkv -> q/k/v_proj and w_gate_up -> gate/up_proj along dim 0,
no permutation (distllm's RoPE already uses HF's rotate_half layout). A tied output projection is
stored once, as ``model.embed_tokens.weight``, with ``tie_word_embeddings: true``.

Tensors are read lazily and written shard by shard, so exporting needs about one shard of memory,
not the whole model. The directory is written next to ``DIR`` under a temporary name and renamed
into place at the end: an interrupted export leaves no half-written model behind.

What it reads of a checkpoint (``distllm.checkpoint``): the commit marker, ``state.json`` ("config"
with the model section and data.dir, "tokenizer_fingerprint"), the whole fp32 tensors of its
``model*.safetensors`` files by parameter name (one file, or one per rank under ZeRO: their union is
the state dict, so a ZeRO-3 checkpoint exports on one CPU host without the GPUs that wrote it), and
its own ``tokenizer.json`` (else data.dir's, checked against the fingerprint), and the chat template
it was trained with (``chat.checkpoint_chat_template``: its ``chat_template.jinja``, else the config's
``sft.chat_template``, else the default), unless ``chat_template`` names another.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from distllm import checkpoint, tensorfile
from distllm.chat import ChatTemplate, checkpoint_chat_template, load_chat_template
from distllm.config import ModelConfig, from_dict
from distllm.errors import CheckpointError, ConfigError, DataError
from distllm.tokenizer import EOT, eot_id, fingerprint, load_tokenizer

TOKENIZER_FILE = "tokenizer.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Piece:
    """One HF tensor: rows [start, stop) of the distllm tensor ``source``."""

    name: str
    source: str
    start: int
    stop: int
    shape: tuple[int, ...]

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def export(target: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32",
           max_shard_gb: float = 5.0, chat_template: str | None = None) -> Path:
    """Write the checkpoint ``target`` (run or checkpoint directory) as an HF Llama directory ``out``.

    ``chat_template``: a Jinja template or the path of one (``chat.load_chat_template``) to write
    instead of the checkpoint's own."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not max_shard_gb > 0:
        raise ConfigError(f"--max-shard-gb must be > 0, got {max_shard_gb}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export directory {out} already exists and is not empty; choose another --out")
    ckpt = checkpoint.locate(target)
    state = checkpoint.read_state(ckpt)
    cfg = _model_config(ckpt, state)
    tok_path = _tokenizer_path(ckpt, state)
    tok = load_tokenizer(tok_path)
    template = (checkpoint_chat_template(ckpt, state) if chat_template is None
                else load_chat_template(chat_template, "--chat-template"))
    if tok.get_vocab_size() > cfg.vocab_size:
        raise CheckpointError(f"tokenizer {tok_path} has {tok.get_vocab_size()} tokens, more than the model's "
                              f"vocab_size {cfg.vocab_size}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        pieces = hf_pieces(cfg)
        _write_weights(tmp, pieces, _Sources(ckpt, cfg, pieces), DTYPES[dtype], int(max_shard_gb * 1e9))
        eot = eot_id(tok)
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, dtype, eot), indent=2) + "\n")
        generation = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_tokenizer_files(tmp, tok_path, cfg.max_seq_len, template)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def hf_pieces(cfg: ModelConfig) -> list[Piece]:
    """Every tensor of the HF model, in HF order, as rows of a distllm tensor (the name mapping)."""
    d, hd, nh, nkv, h = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim

    def whole(name: str, source: str, shape: tuple[int, ...]) -> Piece:
        return Piece(name, source, 0, shape[0], shape)

    pieces = [whole("model.embed_tokens.weight", "tok_emb.weight", (cfg.vocab_size, d))]
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        q, kv = nh * hd, nkv * hd
        pieces += [
            whole(hf + "input_layernorm.weight", ours + "attn_norm.weight", (d,)),
            Piece(hf + "self_attn.q_proj.weight", ours + "attn.wqkv.weight", 0, q, (q, d)),
            Piece(hf + "self_attn.k_proj.weight", ours + "attn.wqkv.weight", q, q + kv, (kv, d)),
            Piece(hf + "self_attn.v_proj.weight", ours + "attn.wqkv.weight", q + kv, q + 2 * kv, (kv, d)),
            whole(hf + "self_attn.o_proj.weight", ours + "attn.wo.weight", (d, q)),
            whole(hf + "post_attention_layernorm.weight", ours + "mlp_norm.weight", (d,)),
            Piece(hf + "mlp.gate_proj.weight", ours + "mlp.w_gate_up.weight", 0, h, (h, d)),
            Piece(hf + "mlp.up_proj.weight", ours + "mlp.w_gate_up.weight", h, 2 * h, (h, d)),
            whole(hf + "mlp.down_proj.weight", ours + "mlp.w_down.weight", (d, h)),
        ]
    pieces.append(whole("model.norm.weight", "norm.weight", (d,)))
    if not cfg.tie_embeddings:
        pieces.append(whole("lm_head.weight", "lm_head.weight", (cfg.vocab_size, d)))
    return pieces


def hf_config(cfg: ModelConfig, dtype: str, eot: int) -> dict:
    """``config.json`` of a ``LlamaForCausalLM`` with the shape of ``cfg`` (read by transformers 4.51+ and 5)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": dtype,  # transformers 4.x
        "dtype": dtype,  # transformers 5
    }


# ---------------------------------------------------------------------------------------------
# reading the checkpoint (distllm.checkpoint: locate, read_state, TensorReader)
# ---------------------------------------------------------------------------------------------


def _model_config(ckpt: Path, state: dict) -> ModelConfig:
    model = (state.get("config") or {}).get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{ckpt / 'state.json'} has no config.model section")
    try:
        return from_dict({"model": model}).model
    except ConfigError as e:
        raise CheckpointError(f"{ckpt / 'state.json'}: {e}") from None


def _tokenizer_path(ckpt: Path, state: dict) -> Path:
    """The checkpoint's own tokenizer.json, else the data directory's, which must be the one it was
    trained with (same fingerprint)."""
    if (ckpt / TOKENIZER_FILE).is_file():
        return ckpt / TOKENIZER_FILE
    data_dir = ((state.get("config") or {}).get("data") or {}).get("dir")
    if not data_dir:
        raise CheckpointError(f"checkpoint {ckpt} has no {TOKENIZER_FILE} and its config names no data.dir")
    path = Path(data_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"tokenizer not found: {path} (checkpoint {ckpt} has no copy of its own)")
    expected = state.get("tokenizer_fingerprint")
    if expected is not None and fingerprint(load_tokenizer(path)) != expected:
        raise DataError(f"{path} is a different tokenizer than the one checkpoint {ckpt} was trained with")
    return path


class _Sources:
    """The distllm tensors behind the pieces, read one at a time (the last one kept for its next piece)."""

    def __init__(self, ckpt: Path, cfg: ModelConfig, pieces: list[Piece]):
        self.ckpt = ckpt
        self.reader = checkpoint.TensorReader(ckpt)  # whole tensors, from the pieces the manifest indexes
        self.shapes: dict[str, tuple[int, ...]] = {}  # source -> shape the config implies
        for p in pieces:
            rows = max(self.shapes.get(p.source, (0,))[0], p.stop)
            self.shapes[p.source] = (rows, *p.shape[1:])
        missing = sorted(set(self.shapes) - self.reader.keys())
        if missing:
            raise CheckpointError(f"checkpoint {ckpt} lacks the tensors {missing[:5]}; is it a distllm checkpoint?")
        extra = self.reader.keys() - set(self.shapes) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
        if extra:
            raise CheckpointError(f"checkpoint {ckpt} has tensors its config.model does not explain: {sorted(extra)[:5]}")
        self.last: tuple[str, torch.Tensor] | None = None

    def rows(self, piece: Piece) -> torch.Tensor:
        if self.last is None or self.last[0] != piece.source:
            t = self.reader.get(piece.source)
            if tuple(t.shape) != self.shapes[piece.source]:
                raise CheckpointError(f"checkpoint {self.ckpt}: {piece.source} has shape {list(t.shape)}, but its "
                                      f"config.model implies {list(self.shapes[piece.source])}")
            self.last = (piece.source, t)
        return self.last[1][piece.start : piece.stop]


def _write_weights(out: Path, pieces: list[Piece], weights: _Sources, dtype: torch.dtype, max_shard: int) -> None:
    shards = list(_shard(pieces, dtype.itemsize, max_shard))
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    index = {}
    for name, shard in zip(names, shards):
        tensors = {p.name: weights.rows(p).to(dtype).contiguous() for p in shard}
        tensorfile.write(out / name, tensors, metadata={"format": "pt"})  # mode 0644 under umask 022, not 0600
        index.update({p.name: name for p in shard})
        del tensors
    if n > 1:
        total = sum(p.numel() * dtype.itemsize for p in pieces)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2) + "\n"
        )


def _shard(pieces: list[Piece], itemsize: int, max_bytes: int) -> Iterator[list[Piece]]:
    """Consecutive groups of pieces of at most max_bytes each (a larger single tensor gets its own)."""
    shard, size = [], 0
    for p in pieces:
        nbytes = p.numel() * itemsize
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = [], 0
        shard.append(p)
        size += nbytes
    if shard:
        yield shard


def write_tokenizer_files(out: Path, tok_path: Path, max_seq_len: int, template: ChatTemplate) -> None:
    """tokenizer.json, tokenizer_config.json (with ``chat_template``) and special_tokens_map.json into ``out``."""
    shutil.copyfile(tok_path, out / TOKENIZER_FILE)
    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,  # decode exactly as distllm does
        # distllm encodes a literal "<|endoftext|>" inside a text as plain text, never as the separator
        "split_special_tokens": True,
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": template.source,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
