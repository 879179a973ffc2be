"""Errors from talking to a Ray cluster, each a single line for users."""

from __future__ import annotations

from pipeline.errors import SeedlineError


class ClusterError(SeedlineError):
    """A cluster operation that cannot go ahead.

    ``exit_code`` is 2 for problems the user must fix in the command or its environment (an unsafe
    address, a missing or rejected token, an unknown job) and 1 for failures of the cluster itself.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
