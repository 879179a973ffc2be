"""What a training worker does about loss spikes: the ``health:`` section's ``on_spike`` (see
``stages.lm.train_config.HealthConfig``), judged by ``pipeline.health.LossSpikes``.

Every rank holds a ``SpikeGuard`` fed the same numbers (losses averaged over ranks), so all ranks decide
alike without another collective. Its history is part of the checkpoint (``state_dict``), so a resumed or
rolled-back run judges exactly as an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

from pipeline.health import HealthRules, LossSpikes


class Diverged(Exception):
    """The loss diverged and ``on_spike`` says stop (or no rollback is left); names the step."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class SpikeGuard:
    """The spike rule plus the action; one per worker, restored from the checkpoint's trainer state."""

    def __init__(self, health: Any, state: dict[str, Any] | None = None):
        state = state or {}
        self.action = health.on_spike
        self.max_rollbacks = health.max_rollbacks
        self.rules = HealthRules(**health.rules())
        self.spikes = LossSpikes(self.rules, state.get("losses"), state.get("run", 0))
        self.rollbacks = int(state.get("rollbacks", 0))

    def restore(self, state: dict[str, Any] | None) -> None:
        """The spike history of a checkpoint (a rollback); the rollback count stays."""
        state = state or {}
        self.spikes = LossSpikes(self.rules, state.get("losses"), state.get("run", 0))

    def drops(self, micro_batch_loss: float) -> bool:
        """``skip_batch``: whether a micro-batch whose loss (mean over ranks) is this must be dropped
        before its backward."""
        return self.action == "skip_batch" and self.spikes.is_spike(micro_batch_loss)

    def judge(self, step: int, loss: float) -> dict[str, Any] | None:
        """Record step ``step``'s loss; the event it makes (``spike`` or ``diverging``), or None."""
        median = self.spikes.median()
        if not self.spikes.add(loss):
            return None
        kind = "diverging" if self.spikes.diverging else "spike"
        return {"event": kind, "step": step, "event_loss": loss, "loss_median": median,
                "spike_run": self.spikes.run, "action": self.action if kind == "diverging" else "warn"}

    def must_stop(self, step: int) -> Diverged | None:
        """At a divergence: the error that ends the stage (``fail``, or ``rollback`` with none left)."""
        if self.action == "fail":
            return Diverged(step, f"the loss diverged at step {step} ({self.spikes.run} spikes in a row "
                                  "above health.spike_factor x its running median); health.on_spike: fail "
                                  "stopped the stage. The newest checkpoint is before the spikes: lower "
                                  "train.lr, or set health.on_spike: rollback")
        if self.action == "rollback" and self.rollbacks >= self.max_rollbacks:
            return Diverged(step, f"the loss diverged at step {step} after {self.rollbacks} rollback(s) "
                                  f"(health.max_rollbacks: {self.max_rollbacks}); stopped")
        return None

    def wants_rollback(self) -> bool:
        return self.action == "rollback" and self.spikes.diverging

    def state_dict(self) -> dict[str, Any]:
        return {**self.spikes.state_dict(), "rollbacks": self.rollbacks}


def skip_steps(loader: Any, steps: int, grad_accum: int) -> None:
    """Pass over the micro-batches of ``steps`` optimizer steps (no data is read when the loader can skip
    by position)."""
    advance = getattr(loader, "next_indices", None) or (lambda: next(loader))
    for _ in range(steps * grad_accum):
        advance()


def config_skips(skip_data: list[tuple[int, int]], step: int) -> int:
    """Steps of data ``train.skip_data`` passes over right before optimizer step ``step``."""
    return sum(last - first + 1 for first, last in skip_data if first == step)
