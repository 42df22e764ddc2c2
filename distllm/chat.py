"""Chat template: messages -> text (exactly as ``transformers`` renders it) -> tokens + response mask.

A chat template is a Jinja template over ``messages`` (a list of ``{"role", "content"}``), as in
Hugging Face's ``tokenizer_config.json``. ``distllm export`` writes ours there (``chat_template``),
so ``AutoTokenizer.from_pretrained(export).apply_chat_template(messages, tokenize=False)`` gives
byte for byte the text ``ChatTemplate.render`` gives. For that the template is rendered the way
``transformers`` renders it: a sandboxed Jinja environment (``ImmutableSandboxedEnvironment``) with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` block
tag (rendered as its body), the globals ``raise_exception``, ``strftime_now``, ``dict`` and a
``namespace`` without underscore names, a ``tojson`` filter that does not escape HTML, and the
variables ``messages``, ``tools`` (None), ``documents`` (None), ``add_generation_prompt`` and the
special tokens ``bos_token`` / ``eos_token`` / ``pad_token`` (all ``<|endoftext|>`` in an export).
Messages reach the template as ``{"role", "content"}`` dicts, nothing else.

``DEFAULT_CHAT_TEMPLATE`` is the Alpaca prompt format: an optional system message first, each user
turn as ``### Instruction:`` and each assistant turn as ``### Response:`` followed by the answer and
the end-of-sequence token; blank lines between turns; ``add_generation_prompt`` ends with the
``### Response:`` header. A user template must end each assistant turn with ``{{ eos_token }}``
(never the literal text ``<|endoftext|>``, which the tokenizer reads as plain text).

The response mask does not rely on ``{% generation %}`` markers (stock templates have none, which
gives all-zero assistant masks in TRL): the text of assistant turn i is the span between the
rendering of ``messages[:i]`` with ``add_generation_prompt=True`` and the rendering of
``messages[:i+1]``; both must be prefixes of the whole conversation's rendering. Rendering is done
with a private sentinel in place of the end-of-sequence token, so the text is tokenized in pieces
between sentinels and each sentinel becomes the real ``<|endoftext|>`` id, while the same string
inside a message stays plain text. Character spans map to tokens through the tokenizer's offsets:
a token is a response token if it overlaps an assistant span (every assistant turn including its
end-of-sequence token, and whatever else the template writes inside the turn).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from distllm.errors import ConfigError, DataError
from distllm.tokenizer import EOT, eot_id

ROLES = ("system", "user", "assistant")

DEFAULT_CHAT_TEMPLATE = r"""{%- for message in messages %}
    {%- if not loop.first %}{{ '\n\n' }}{% endif %}
    {%- if message['role'] == 'system' %}
        {{- message['content'] }}
    {%- elif message['role'] == 'user' %}
        {{- '### Instruction:\n' + message['content'] }}
    {%- elif message['role'] == 'assistant' %}
        {{- '### Response:\n' }}
        {%- generation %}{{ message['content'] + eos_token }}{% endgeneration %}
    {%- else %}
        {{- raise_exception('unknown role: ' + message['role']) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {%- if messages %}{{ '\n\n' }}{% endif %}
    {{- '### Response:\n' }}
{%- endif %}"""
"""The Alpaca prompt format (without its fixed preamble; a system message takes that place)."""

_SENTINEL = "\U0010fffe"
"""Stands for the end-of-sequence token while rendering for tokenization (a Unicode noncharacter)."""

_PROBE = [  # renders every role and two assistant turns: checks a template once, up front
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
    {"role": "assistant", "content": "A2"},
]


# --------------------------------------------------------------------------- the Jinja environment


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body (transformers uses it to mark
    assistant text; we find assistant spans by rendering prefixes instead)."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace()`` that refuses attribute names starting with an underscore."""

    def __init__(*args, **kwargs):  # same calling convention as jinja2.utils.Namespace (no named self)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r} on a namespace")


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` inside a template, without exposing the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(), namespace=_Namespace)
    return env


# --------------------------------------------------------------------------- messages


def check_messages(messages: object, where: str) -> list[dict]:
    """Validated ``{"role", "content"}`` copies of a conversation; DataError naming ``where`` (file:line).

    Roles are system (first message only), user and assistant; contents are strings; at least one
    assistant turn, none of them empty.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content', got {m!r:.60}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {role!r} (use {', '.join(ROLES)})")
        if role == "system" and i != 1:
            raise DataError(f"{where}: message {i} is a system message; only the first message may be one")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) has content of type {type(content).__name__}, not text")
        if _SENTINEL in content:
            raise DataError(f"{where}: message {i} ({role}) contains the reserved character U+10FFFE")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: message {i} is an empty assistant turn (nothing to learn)")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    return out


# --------------------------------------------------------------------------- the template


@dataclass
class ChatTokens:
    """A tokenized conversation: ``ids`` (L,) int64 and ``mask`` (L,) bool, True on response tokens."""

    ids: np.ndarray
    mask: np.ndarray


class ChatTemplate:
    """A compiled chat template (``source``: Jinja text) for a tokenizer whose end-of-sequence token
    is ``<|endoftext|>``; ConfigError if it does not compile or does not end assistant turns with
    ``{{ eos_token }}``."""

    def __init__(self, source: str, origin: str = "sft.chat_template"):
        self.source, self.origin = source, origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ConfigError(f"{origin}: the chat template does not compile: {e}") from None
        full = self._render_checked(_PROBE, False, _SENTINEL)
        if EOT in full:
            raise ConfigError(f"{origin}: the chat template writes the literal text {EOT}; use {{{{ eos_token }}}}")
        try:
            spans = self._spans(_PROBE, full)
        except DataError as e:
            raise ConfigError(str(e)) from None
        if any(_SENTINEL not in full[a:b] for a, b in spans):
            raise ConfigError(f"{origin}: the chat template must end each assistant turn with {{{{ eos_token }}}} "
                              "(the model has to learn to stop)")

    def _render_checked(self, messages: list[dict], add_generation_prompt: bool, eos: str) -> str:
        try:
            return self._render(messages, add_generation_prompt, eos)
        except DataError as e:
            raise ConfigError(str(e)) from None

    def _render(self, messages: list[dict], add_generation_prompt: bool, eos: str) -> str:
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=eos, eos_token=eos, pad_token=eos)
        except jinja2.TemplateError as e:  # raise_exception(...) included
            raise DataError(f"the chat template ({self.origin}) failed: {e}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, with ``<|endoftext|>`` for the special tokens: byte-identical
        to ``transformers``' ``apply_chat_template(messages, tokenize=False, ...)`` on an export."""
        return self._render(_plain(messages), add_generation_prompt, EOT)

    def _spans(self, messages: list[dict], full: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of the assistant turns in ``full`` (rendered with the sentinel)."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self._render(messages[:i], True, _SENTINEL)
            end = self._render(messages[: i + 1], False, _SENTINEL)
            if not (full.startswith(start) and full.startswith(end) and len(start) < len(end)):
                raise DataError(
                    f"the chat template ({self.origin}) does not render message {i + 1} (assistant) after its "
                    "prompt: rendering the first messages, with and without the generation prompt, must give "
                    "prefixes of the whole conversation"
                )
            spans.append((len(start), len(end)))
        return spans

    def encode(self, tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> ChatTokens:
        """Token ids of the rendered conversation (each end-of-sequence token as its id, text inside
        messages as plain text) and the response mask (see the module doc; all False with
        ``add_generation_prompt``: then the whole conversation is a prompt)."""
        messages = _plain(messages)
        eos = eot_id(tok)
        full = self._render(messages, add_generation_prompt, _SENTINEL)
        spans = [] if add_generation_prompt else self._spans(messages, full)
        ids: list[int] = []
        starts: list[int] = []
        ends: list[int] = []
        pos = 0
        for k, piece in enumerate(full.split(_SENTINEL)):
            if k:  # the sentinel before this piece
                ids.append(eos)
                starts.append(pos - 1)
                ends.append(pos)
            enc = tok.encode(piece, add_special_tokens=False)
            ids.extend(enc.ids)
            starts.extend(pos + a for a, _ in enc.offsets)
            ends.extend(pos + b for _, b in enc.offsets)
            pos += len(piece) + 1
        mask = np.zeros(len(ids), dtype=bool)
        if spans:
            s, e = np.asarray(starts), np.asarray(ends)
            for a, b in spans:
                mask |= (e > a) & (s < b)  # the token overlaps the span
        return ChatTokens(np.asarray(ids, dtype=np.int64), mask)


def _plain(messages: list[dict]) -> list[dict]:
    """What the template sees of each message (as transformers passes it: a fresh dict)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_chat_template(value: str | None, origin: str = "sft.chat_template") -> ChatTemplate:
    """The template a config value names: None -> ``DEFAULT_CHAT_TEMPLATE``; a value holding ``{{`` or
    ``{%`` -> that Jinja text; else the path of a Jinja file."""
    if value is None:
        return ChatTemplate(DEFAULT_CHAT_TEMPLATE, "the default chat template")
    if "{{" in value or "{%" in value:
        return ChatTemplate(value, origin)
    path = Path(os.path.expanduser(value))
    if not path.is_file():
        raise ConfigError(f"{origin}: chat template file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{origin}: cannot read chat template {path}: {e}") from None
    return ChatTemplate(text, f"{origin} ({path})")


CHECKPOINT_TEMPLATE_FILE = "chat_template.jinja"
"""A checkpoint's own chat template (written by SFT next to its tokenizer.json)."""


def checkpoint_chat_template(ckpt: str | os.PathLike, state: dict) -> ChatTemplate:
    """The chat template a checkpoint was trained with: its ``chat_template.jinja``, else the template text
    an SFT run saved in its state.json (``chat_template``), else the ``sft.chat_template`` of its saved
    config, else the default."""
    path = Path(ckpt) / CHECKPOINT_TEMPLATE_FILE
    if path.is_file():
        return ChatTemplate(path.read_text(encoding="utf-8"), str(path))
    if isinstance(state.get("chat_template"), str):
        return ChatTemplate(state["chat_template"], f"{Path(ckpt) / 'state.json'} (chat_template)")
    value = ((state.get("config") or {}).get("sft") or {}).get("chat_template")
    return load_chat_template(value)
