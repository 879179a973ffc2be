"""Errors users see as one clear line (the CLI exits 2 for config errors, with no traceback)."""

from __future__ import annotations

import re


class SeedlineError(Exception):
    """An error with a message meant for users."""


class ConfigError(SeedlineError):
    """A bad config value: names the key path and how to fix it."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class StageFailed(SeedlineError):
    """A stage raised; the run directory records the error."""


class CorruptFile(ConfigError, ValueError):
    """A file Seedline reads (``run.json``, ``status.json``, a config) that cannot be decoded: names the file.

    Also a ``ValueError``, so code that handles undecodable JSON keeps handling it.
    """

    def __init__(self, path: str, problem: str):
        super().__init__(str(path), f"corrupt or unreadable file ({problem}); fix or delete it")


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour and cursor codes (Ray colours its remote tracebacks)."""
    return _ANSI.sub("", text)


def root_cause(e: BaseException) -> BaseException:
    """The exception a stage's code raised, unwrapped from Ray's task/actor error wrappers."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)  # ray.exceptions.RayTaskError and friends
        if isinstance(inner, BaseException):
            e = inner
            continue
        failures = getattr(e, "worker_failures", None)  # Ray Train: {rank: exception}
        if isinstance(failures, dict) and failures:
            first = next(iter(failures.values()))
            if isinstance(first, BaseException):
                e = first
                continue
        break
    return e


def failure_line(e: BaseException) -> str:
    """One line naming what went wrong (``OSError: [Errno 28] No space left on device``), no colour codes,
    no credentials."""
    from pipeline.redact import redact_text

    cause = root_cause(e)
    lines = [ln.strip() for ln in strip_ansi(str(cause)).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1 and (text.startswith("ray::") or "Traceback" in text):
        text = lines[-1]  # a wrapper that kept only the formatted remote traceback: its last line
    name = type(cause).__name__
    line = text if text.startswith(f"{name}:") else f"{name}: {text}" if text else name
    return redact_text(line)[:2000]


def failure_details(e: BaseException) -> str:
    """The full traceback (chained causes and the remote one included) for ``error.txt``: no colour codes,
    no credentials."""
    import traceback

    from pipeline.redact import redact_text

    return redact_text(strip_ansi("".join(traceback.format_exception(e))))
