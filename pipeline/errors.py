"""Errors users see as one clear line (the CLI exits 2 for config errors, with no traceback)."""

from __future__ import annotations


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
