"""The one rule for keeping credentials out of everything Seedline writes or prints.

Applied to ``run.json``, each stage's ``config.json``, ``status.json``, ``error.txt`` and ``logs/``, to
MLflow params and tags, and to everything the CLI prints (stderr, ``seedline status``). Two things are
secrets:

- the value of a key that looks like a secret: one whose words (split at ``_``, ``-``, ``.`` and case
  changes) include ``password``, ``passwd``, ``secret``, ``token``, ``credential(s)``, ``apikey``, or the
  pairs ``api key``, ``access key``, ``private key``, ``secret key``; ``tokenizer`` and ``max_new_tokens``
  are not secrets;
- in any text: the user-info part of a URL (``https://user:secret@host`` becomes
  ``https://***:***@host``), secret-looking query parameters (``?token=...``) and ``key=value`` /
  ``key: value`` pairs whose key looks like a secret.
"""

from __future__ import annotations

import io
import re
from typing import Any

MASK = "***"
_SECRET_WORDS = {"password", "passwd", "pwd", "secret", "token", "credential", "credentials", "apikey",
                 "passphrase", "signature"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"),
                 ("auth", "key"), ("signing", "key")}
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/@\s'\"<>]+)@")
_QUERY = re.compile(r"(?P<key>[?&;][A-Za-z0-9_.-]+=)(?P<value>[^&#\s'\"<>]+)")
_PAIR = re.compile(r"(?P<key>[\"']?[A-Za-z][A-Za-z0-9_.-]*[\"']?\s*(?:=|:\s)\s*[\"']?)"
                   r"(?P<value>[^\s\"',;&}\]]+)")


def is_secret_key(key: str) -> bool:
    """Whether a config key (or a dotted key path: its last part) names a secret."""
    last = str(key).rsplit(".", 1)[-1]
    words = [w.lower() for w in re.split(r"[_\-\s]+", _CAMEL.sub("_", last)) if w]
    if any(w in _SECRET_WORDS for w in words):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False))


def _mask_userinfo(m: re.Match) -> str:
    info = m.group("info")
    if ":" in info:
        remember_secret(info.split(":", 1)[1])
    return f"{m.group('scheme')}{MASK}:{MASK}@" if ":" in info else f"{m.group('scheme')}{MASK}@"


def _mask_query(m: re.Match) -> str:
    key = m.group("key")[1:-1]
    return f"{m.group('key')}{MASK}" if is_secret_key(key) else m.group(0)


def _mask_pair(m: re.Match) -> str:
    key = m.group("key").strip("\"' :=")
    if not is_secret_key(key) or m.group("value") == MASK:
        return m.group(0)
    return f"{m.group('key')}{MASK}"


# Secret values seen by redact_value in this process (a config's api_token, say): masked wherever they
# appear later, even alone (a worker printing the bare token to a log). Short values are left out: they
# would mask ordinary words.
_KNOWN: set[str] = set()
_MIN_KNOWN = 6


def remember_secret(value: str) -> None:
    """Mask ``value`` in every text redacted from now on in this process."""
    if len(value) >= _MIN_KNOWN and value != MASK:
        _KNOWN.add(value)


def redact_text(text: str) -> str:
    """``text`` with URL credentials, secret-looking ``key=value`` pairs and known secret values masked."""
    if not text:
        return text
    for value in _KNOWN:
        if value in text:
            text = text.replace(value, MASK)
    text = _USERINFO.sub(_mask_userinfo, text)
    text = _QUERY.sub(_mask_query, text)
    return _PAIR.sub(_mask_pair, text)


def redact_value(key: str, value: Any) -> Any:
    """One value stored under ``key``: masked whole when the key looks like a secret (and it is set)."""
    if is_secret_key(key) and value not in (None, "", [], {}) and not isinstance(value, bool):
        if isinstance(value, str):
            remember_secret(value)
        return MASK
    return redact_obj(value)


def redact_obj(obj: Any) -> Any:
    """A JSON-like structure with every secret masked (a new object; the input is not changed)."""
    if isinstance(obj, dict):
        return {k: redact_value(str(k), v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def holds_mask(obj: Any, path: str = "") -> str | None:
    """The key path of the first masked value in ``obj`` (a redacted record cannot be run again), or None."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = holds_mask(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found = holds_mask(v, f"{path}.{i}")
            if found:
                return found
    elif isinstance(obj, str) and (obj == MASK or f"{MASK}@" in obj or f"={MASK}" in obj):
        return path or "(value)"
    return None


class RedactingStream(io.TextIOBase):
    """A text stream that masks secrets in whatever is written, then passes it on (stdout/stderr)."""

    def __init__(self, inner: Any):
        self._inner = inner

    def write(self, s: str) -> int:
        self._inner.write(redact_text(s))
        return len(s)

    def flush(self) -> None:
        self._inner.flush()

    def isatty(self) -> bool:
        return self._inner.isatty()

    def fileno(self) -> int:
        return self._inner.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._inner, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
