"""Autoregressive sampling from a Transformer: greedy, temperature, top-k and top-p (nucleus).

With ``use_cache`` the prompt is run once (prefill) into a KV cache and every further step feeds
one token; without it, every step re-runs the whole sequence (cropped to the last max_seq_len
tokens). Both give the same tokens. A sequence longer than max_seq_len no longer fits the cache,
so from then on the cached path also re-runs the cropped window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the k largest logits of each row (..., V) to -inf (ties with the k-th are kept)."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep, per row (..., V), the smallest set of most likely tokens whose probabilities sum to >= p."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
    drop_sorted = before >= p  # the set already reached p without this token (never drops the first)
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 = greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def generate(
    model,
    prompt: torch.Tensor | list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend prompt (B, T0) (or a list of ids, B = 1) by up to max_new_tokens; returns (B, T0 + n).

    Stops early once every row has produced ``eos_id``; rows that finished earlier are padded with
    ``eos_id``. Runs in eval mode under inference_mode and restores the model's training flag.
    """
    device = model.tok_emb.weight.device
    tokens = torch.as_tensor(prompt, dtype=torch.long, device=device)
    if tokens.dim() == 1:
        tokens = tokens[None]  # (1, T0)
    if tokens.dim() != 2 or tokens.size(1) == 0:
        raise ValueError(f"prompt must be a non-empty (B, T0) tensor or list of ids, got shape {tuple(tokens.shape)}")
    max_seq_len = model.cfg.max_seq_len
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            B = tokens.size(0)
            cache = None
            if use_cache:
                cache = model.new_kv_cache(B, min(tokens.size(1) + max_new_tokens, max_seq_len))
            cached = 0  # positions already in the cache
            finished = torch.zeros(B, dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                if cache is not None and tokens.size(1) <= cache.max_len:
                    logits = model(tokens[:, cached:], cache=cache, start_pos=cached)[:, -1]  # (B, V)
                    cached = tokens.size(1)
                else:
                    logits = model(tokens[:, -max_seq_len:])[:, -1]  # (B, V)
                next_id = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
                if eos_id is not None:
                    next_id = next_id.masked_fill(finished, eos_id)
                    finished |= next_id == eos_id
                tokens = torch.cat((tokens, next_id[:, None]), dim=1)
                if eos_id is not None and bool(finished.all()):
                    break
    finally:
        model.train(was_training)
    return tokens


def chat_generate(model, tok, template, messages: list[dict], max_new_tokens: int, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None) -> tuple[str, list[int]]:
    """The assistant's reply to ``messages``: the conversation rendered by ``template`` (a
    ``distllm.chat.ChatTemplate``) with the generation prompt, continued until the end-of-sequence
    token (or ``max_new_tokens``). Returns (reply text without the end-of-sequence token, new ids
    including it when it was produced)."""
    from distllm.tokenizer import eot_id

    eos = eot_id(tok)
    ids = template.encode(tok, messages, add_generation_prompt=True).ids.tolist()
    out = generate(model, ids, max_new_tokens, temperature, top_k, top_p, eos_id=eos, generator=generator)
    new = out[0, len(ids):].tolist()
    reply = new[: new.index(eos)] if eos in new else new
    return tok.decode(reply, skip_special_tokens=True), new


def run_generate(cfg, spec: str | None, prompt: str, max_new_tokens: int, temperature: float,
                 top_k: int | None, top_p: float | None, seed: int, chat: bool = False,
                 system: str | None = None) -> str:
    """``distllm generate``: continue ``prompt`` with the checkpoint ``spec`` (default: latest of run.dir).

    ``chat``: ``prompt`` is a user message (after an optional ``system`` message); the conversation
    is rendered with the checkpoint's chat template and the assistant's reply returned, generated up
    to the end-of-sequence token."""
    from pathlib import Path

    from distllm.data.shards import TOKENIZER_FILE
    from distllm.errors import DataError
    from distllm.evaluate import load_for_inference
    from distllm.tokenizer import eot_id, fingerprint, load_tokenizer

    model, state, path = load_for_inference(cfg, spec)
    device = next(model.parameters()).device
    tok_file = path / TOKENIZER_FILE  # the copy saved with the checkpoint, else the data directory's
    if not tok_file.is_file():
        from distllm.data.storage import store_from_config

        tok_file = store_from_config(cfg.data).local_path(TOKENIZER_FILE)
    tok = load_tokenizer(tok_file)
    if fingerprint(tok) != state["tokenizer_fingerprint"]:
        raise DataError(f"{Path(cfg.data.dir) / TOKENIZER_FILE} is a different tokenizer than the one checkpoint "
                        f"{path} was trained with; point data.dir at that run's data")
    generator = torch.Generator(device=device).manual_seed(seed)
    if chat:
        from distllm.chat import checkpoint_chat_template

        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        reply, _ = chat_generate(model, tok, checkpoint_chat_template(path, state), messages, max_new_tokens,
                                 temperature, top_k, top_p, generator)
        return reply
    ids = tok.encode(prompt).ids
    if not ids:
        raise DataError("the prompt is empty; pass some text with --prompt")
    out = generate(model, ids, max_new_tokens, temperature, top_k, top_p, eos_id=eot_id(tok), generator=generator)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)
