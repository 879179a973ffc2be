"""Live health of a running stage, from its progress reports alone (no Ray, no torch).

Every ``Progress.update`` passes through ``observe``, which keeps in the progress state:

- ``median_step_s``: the median time between advances (training steps, or finished tasks of a data stage);
- ``tokens_per_s``: the recent token rate (training);
- ``loss_median`` and ``spike_run``: the running median of the last ``spike_window`` losses and how many
  consecutive steps the loss has been above ``spike_factor`` times it; ``diverging`` once that run reaches
  ``spike_steps`` (after ``warmup_steps`` of history).

``classify`` turns a stage's status and progress into what ``seedline status`` shows: ``stalled`` when
the last advance is older than ``stall_factor`` times the median step time (at least ``stall_min_s``),
``diverging`` as above, else the recorded state.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

HISTORY = 64


@dataclass(frozen=True)
class HealthRules:
    """The thresholds (a training stage's ``health:`` section sets them; these are the defaults)."""

    stall_factor: float = 10.0
    stall_min_s: float = 60.0
    spike_factor: float = 2.0
    spike_window: int = 50
    spike_steps: int = 3
    warmup_steps: int = 10

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Observer:
    """Per-process history behind ``observe`` (rank 0 of a training stage, or the driver)."""

    def __init__(self, rules: HealthRules):
        self.rules = rules
        self.advances: list[float] = []
        self.losses: list[float] = []
        self.last_mark: tuple[Any, float] | None = None
        self.last_tokens: tuple[float, float] | None = None

    def observe(self, state: dict[str, Any], fields: dict[str, Any], now: float) -> None:
        """Fold one progress update (``fields``, already merged into ``state``) into the health fields."""
        mark = fields.get("step") if isinstance(fields.get("step"), int) else fields.get("done")
        if mark is not None:
            if self.last_mark is not None and mark != self.last_mark[0]:
                self.advances = (self.advances + [now - self.last_mark[1]])[-HISTORY:]
                state["median_step_s"] = round(statistics.median(self.advances), 4)
                state["advanced"] = now
            if self.last_mark is None or mark != self.last_mark[0]:
                self.last_mark = (mark, now)
                state.setdefault("advanced", now)
        if isinstance(fields.get("tokens"), int | float):
            if self.last_tokens and now > self.last_tokens[1] and fields["tokens"] > self.last_tokens[0]:
                rate = (fields["tokens"] - self.last_tokens[0]) / (now - self.last_tokens[1])
                state["tokens_per_s"] = round(rate)
            self.last_tokens = (float(fields["tokens"]), now)
        if isinstance(fields.get("loss"), int | float):
            self._loss(state, float(fields["loss"]))
        state["health_rules"] = self.rules.as_dict()

    def _loss(self, state: dict[str, Any], loss: float) -> None:
        r = self.rules
        if len(self.losses) >= r.warmup_steps:
            median = statistics.median(self.losses[-r.spike_window:])
            state["loss_median"] = round(median, 4)
            spike = loss != loss or loss > r.spike_factor * median  # NaN counts as a spike
            state["spike_run"] = state.get("spike_run", 0) + 1 if spike else 0
            state["diverging"] = state["spike_run"] >= r.spike_steps
            if spike:
                return  # a spike does not move the median it is judged against
        self.losses = (self.losses + [loss])[-r.spike_window:]


def classify(state: str, progress: dict[str, Any], now: float) -> str:
    """What a stage is doing: its recorded ``state``, or ``stalled`` / ``diverging`` while running."""
    if state != "running":
        return state
    if progress.get("diverging"):
        return "diverging"
    rules = HealthRules(**(progress.get("health_rules") or {}))
    median = progress.get("median_step_s")
    last = progress.get("advanced") or progress.get("updated")
    if median and last and now - last > max(rules.stall_factor * median, rules.stall_min_s):
        return "stalled"
    return state
