"""Credentials never leave the machine: redact them from every copy of the config that is written or sent.

The resolved config is copied into ``RUN_DIR/config.yaml``, every checkpoint's ``state.json`` and
the parameters of each experiment tracker (W&B, MLflow, TensorBoard), and ``data.storage_options``
(or a URL) may hold credentials. ``redact(config)`` returns a copy in which these are replaced by
``REDACTED``:

- the value of any key named like a credential: a word of the key (split at ``_``, ``-``, ``.``
  and camelCase) is one of ``SECRET_WORDS`` (``key``, ``secret``, ``token``, ``password``,
  ``credential(s)``, ``auth``, ``signature``, ...), or the whole key is one of ``SECRET_NAMES``
  (``connection_string``, ...). ``shard_tokens`` or ``tokenizer`` are not credentials: ``tokens``
  and ``tokenizer`` are other words than ``token``;
- the password in a URL's user info (``s3://user:PASS@host``, ``http://user:PASS@host``), or the
  whole user info when it has no password (``https://TOKEN@host``), anywhere in a string, and
  credential-like query parameters (``?X-Amz-Signature=...``, ``&sig=...``);
- the same in dictionary keys (``data.mix`` is keyed by data directories, which may be URLs).

``secret_values(config)`` lists the originals that ``redact`` removes, so that a line of text (a log
line, an exception message) can be cleaned with ``redact_text(text, secrets)`` even where the
secret appears without its key. ``drop_redacted(config)`` removes the redacted entries from a
config read back from a run (``distllm eval RUN_DIR``), so that a storage backend falls back to
its environment credentials instead of trying the placeholder.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

REDACTED = "<redacted>"

SECRET_WORDS = frozenset({
    "key", "keys", "apikey", "secret", "secrets", "token", "password", "passwd", "pwd", "passphrase",
    "credential", "credentials", "creds", "auth", "authorization", "signature", "sig", "cookie", "bearer",
})  # fmt: skip
"""A key with one of these words holds a credential (``aws_secret_access_key``, ``sessionToken``, ``sas_token``)."""
SECRET_NAMES = frozenset({"connection_string", "connectionstring", "private_key", "client_secret", "sas"})
"""Whole key names (lower-cased) that hold a credential without one of ``SECRET_WORDS``."""

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s:/@?#]*)(?::(?P<pw>[^\s]*))?@")
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[^&#\s'\"]*)")
_MIN_SECRET = 4  # shorter values are not looked for in free text (they would match too much)


def is_secret_key(name: Any) -> bool:
    """True for a key named like a credential (see the module docstring)."""
    if not isinstance(name, str) or not _NAME.match(name):
        return False  # a path or URL used as a key (data.mix) is no key name
    if name.lower().replace("-", "_") in SECRET_NAMES:
        return True
    return any(w.lower() in SECRET_WORDS for w in _WORD.findall(name))


def redact(value: Any, found: set[str] | None = None) -> Any:
    """A copy of ``value`` (nested dicts, lists, scalars) with credentials replaced by ``REDACTED``.

    ``found`` (optional) collects the original secret strings that were removed.
    """
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            key = _redact_str(k, found) if isinstance(k, str) else k
            out[key] = _redact_whole(v, found) if is_secret_key(k) and _can_hold_secret(v) else redact(v, found)
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, found) for v in value)
    if isinstance(value, str):
        return _redact_str(value, found)
    return value


def secret_values(value: Any) -> set[str]:
    """The credential strings that ``redact(value)`` removes (for ``redact_text``)."""
    found: set[str] = set()
    redact(value, found)
    return {s for s in found if len(s) >= _MIN_SECRET}


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL credentials and every occurrence of ``secrets`` replaced by ``REDACTED``."""
    for s in sorted(secrets, key=len, reverse=True):  # longest first: one secret may contain another
        if len(s) >= _MIN_SECRET:
            text = text.replace(s, REDACTED)
    return _redact_str(text, None)


def drop_redacted(value: Any) -> Any:
    """A config read back from a run without its redacted entries: keys whose value is ``REDACTED`` are
    removed, and a URL's ``user:<redacted>@`` becomes ``user@`` (credentials then come from the
    environment or from overrides)."""
    if isinstance(value, dict):
        return {drop_redacted(k): drop_redacted(v) for k, v in value.items() if v != REDACTED}
    if isinstance(value, list):
        return [drop_redacted(v) for v in value if v != REDACTED]
    if isinstance(value, str) and REDACTED in value:
        return value.replace(":" + REDACTED + "@", "@").replace(REDACTED + "@", "")
    return value


def _can_hold_secret(value: Any) -> bool:
    """None, "", a boolean or an empty container under a credential-like key hide nothing."""
    return not (value is None or isinstance(value, bool) or value == "" or value == {} or value == [])


def _redact_whole(value: Any, found: set[str] | None) -> Any:
    """The value of a credential key: every string in it is a secret."""
    if found is not None:
        _collect_strings(value, found)
    return REDACTED


def _collect_strings(value: Any, found: set[str]) -> None:
    if isinstance(value, dict):
        for v in value.values():
            _collect_strings(v, found)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect_strings(v, found)
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        found.add(str(value))


def _redact_str(text: str, found: set[str] | None) -> str:
    if "@" in text and "://" in text:
        def userinfo(m: re.Match) -> str:
            user, pw = m.group("user"), m.group("pw")
            if pw:  # user:password@ -> user:<redacted>@
                if found is not None:
                    found.add(pw)
                return f"{m.group('scheme')}{user}:{REDACTED}@"
            if user and user != REDACTED:  # a user-only token (https://TOKEN@host)
                if found is not None:
                    found.add(user)
                return f"{m.group('scheme')}{REDACTED}@"
            return m.group(0)

        text = _URL_USERINFO.sub(userinfo, text)
    if "=" in text:
        def param(m: re.Match) -> str:
            if not is_secret_key(m.group("name")) or m.group("value") in ("", REDACTED):
                return m.group(0)
            if found is not None:
                found.add(m.group("value"))
            return f"{m.group('sep')}{m.group('name')}={REDACTED}"

        text = _QUERY_PARAM.sub(param, text)
    return text


def command_line_has_secrets(secrets: Iterable[str], argv: list[str] | None = None) -> bool:
    """True when the command line (``sys.argv``) holds one of ``secrets`` or a URL credential: a tool that
    records the command line (W&B's system metadata) must then be told not to."""
    import sys

    argv = sys.argv if argv is None else argv
    return any(s in arg for arg in argv for s in secrets) or any(redact_text(arg) != arg for arg in argv)
