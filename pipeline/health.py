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


class LossSpikes:
    """The loss-spike rule, fed one loss per step: a loss above ``spike_factor`` times the median of the last
    ``spike_window`` normal losses (after ``warmup_steps`` of them) is a spike, and a spike does not move
    that median; ``spike_steps`` spikes in a row are a divergence. Training workers keep one in their
    checkpoints (``state_dict``) so a resumed run judges exactly as an uninterrupted one."""

    def __init__(self, rules: HealthRules, losses: list[float] | None = None, run: int = 0):
        self.rules = rules
        self.losses = list(losses or [])
        self.run = run  # consecutive spikes so far

    def median(self) -> float | None:
        """The median the next loss is judged against (None while warming up)."""
        r = self.rules
        if len(self.losses) < r.warmup_steps:
            return None
        return statistics.median(self.losses[-r.spike_window:])

    def is_spike(self, loss: float) -> bool:
        """Whether ``loss`` would be a spike (nothing recorded)."""
        median = self.median()
        return median is not None and (loss != loss or loss > self.rules.spike_factor * median)

    def add(self, loss: float) -> bool:
        """Record one step's loss; whether it was a spike."""
        spike = self.is_spike(loss)
        self.run = self.run + 1 if spike else 0
        if not spike:
            self.losses = (self.losses + [loss])[-self.rules.spike_window:]
        return spike

    @property
    def diverging(self) -> bool:
        return self.run >= self.rules.spike_steps

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "run": self.run}


class Observer:
    """Per-process history behind ``observe`` (rank 0 of a training stage, or the driver)."""

    def __init__(self, rules: HealthRules):
        self.rules = rules
        self.advances: list[float] = []
        self.spikes = LossSpikes(rules)
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
        median = self.spikes.median()
        self.spikes.add(loss)
        if median is not None:
            state["loss_median"] = round(median, 4)
            state["spike_run"] = self.spikes.run
            state["diverging"] = self.spikes.diverging


def classify(state: str, progress: dict[str, Any], now: float) -> str:
    """What a stage is doing: its recorded ``state``, or ``stalled`` / ``diverging`` while running."""
    if state != "running":
        return state
    if progress.get("diverging"):
        return "diverging"
    rules = HealthRules(**(progress.get("health_rules") or {}))
    median = progress.get("median_step_s")
    last = progress.get("advanced") or progress.get("updated")
    if not last:
        return state
    if median:
        limit = max(rules.stall_factor * median, rules.stall_min_s)
    elif progress.get("unit") == "steps" and progress.get("step"):
        limit = rules.stall_min_s  # training that stopped before a step time was written (fast steps)
    else:
        return state
    return "stalled" if now - last > limit else state
