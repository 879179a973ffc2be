"""Where rank 0's training metrics go: ``metrics.jsonl``, ``perf.jsonl``, MLflow, stage progress.

``metrics.jsonl`` holds one line per optimizer step (``step``, ``loss``, ``lr``, ``grad_norm``,
``tokens``, the task's extras), one per validation (``step`` plus ``eval_*``) and one per health event
(``step``, ``event``: spike, diverging, rollback, stall, with its details): values that depend only
on the config and data, so a resumed run's file is byte-identical to an uninterrupted run's (on resume
the lines after the checkpoint's step are dropped). Timing (``tokens_per_s``, ``mfu``, ``step_time_s``)
goes to ``perf.jsonl``. MLflow gets both, every ``log_every`` steps (validation always).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch


def truncate_jsonl(path: Path, upto_step: int, keep_events: bool = False) -> None:
    """Keep only the lines with ``step <= upto_step`` (and, with ``keep_events``, every health event line)
    atomically; nothing if the file is missing."""
    if not path.is_file():
        return
    keep = []
    for ln in path.read_text().splitlines():
        row = json.loads(ln) if ln else None
        if row is not None and (row["step"] <= upto_step or (keep_events and "event" in row)):
            keep.append(ln)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


class MetricsSink:
    """Rank 0's metric writer (one per worker-group attempt)."""

    def __init__(self, out_dir: Path, start_step: int, total_steps: int, log_every: int, tracker_spec: dict,
                 progress: Any, logger_name: str = "seedline.train"):
        from pipeline.tracking import tracker_from_spec

        self.metrics_path = out_dir / "metrics.jsonl"
        self.perf_path = out_dir / "perf.jsonl"
        for p in (self.metrics_path, self.perf_path):
            truncate_jsonl(p, start_step)
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self.tracker = tracker_from_spec(tracker_spec)
        if tracker_spec.get("enabled"):
            import mlflow

            # MLflow's system-metrics monitor reads the process-wide tracking URI, not the tracker's
            mlflow.set_tracking_uri(tracker_spec["uri"])
        self.tracker.start_system_metrics()
        self.progress = progress
        self.logger_name = logger_name
        self._files = {p: open(p, "a") for p in (self.metrics_path, self.perf_path)}  # noqa: SIM115 (closed in close())
        self._step_times: list[float] = []
        self._events: dict[str, int] = {}

    def _write(self, path: Path, record: dict[str, Any]) -> None:
        f = self._files[path]
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()

    def train_step(self, step: int, metrics: dict[str, float], perf: dict[str, float], tokens: int) -> None:
        """Record optimizer step ``step`` (1-based)."""
        self._write(self.metrics_path, {"step": step, **metrics, "tokens": tokens})
        self._write(self.perf_path, {"step": step, **perf})
        self._step_times.append(perf["step_time_s"])
        recent = self._step_times[-20:]
        eta = (self.total_steps - step) * sum(recent) / len(recent)
        self.progress.update(step=step, total=self.total_steps, done=step, unit="steps", tokens=tokens,
                             eta_s=round(eta, 1), loss=round(metrics["loss"], 4))
        if step % self.log_every == 0 or step == self.total_steps:
            self.tracker.log_metrics({**metrics, **perf, "tokens": tokens}, step=step)
            logging.getLogger(self.logger_name).info(
                "%s: step %d/%d loss %.4f lr %.3g grad_norm %.3g tokens/s %.0f",
                self.logger_name.rpartition(".")[2], step, self.total_steps, metrics["loss"], metrics["lr"],
                metrics["grad_norm"], perf["tokens_per_s"])

    def event(self, record: dict[str, Any], message: str) -> None:
        """A health event (``record`` has ``step`` and ``event``): a ``metrics.jsonl`` line, a warning on
        the console, an MLflow tag (``health.<event>``: the message) and a metric (``health/<event>``: how
        many so far)."""
        self._write(self.metrics_path, record)
        self._events[record["event"]] = self._events.get(record["event"], 0) + 1
        logging.getLogger(self.logger_name).warning("%s", message)
        self.tracker.set_tags({f"health.{record['event']}": message[:5000]})
        self.tracker.log_metrics({f"health/{record['event']}": float(self._events[record["event"]])},
                                 step=record["step"])

    def note(self, record: dict[str, Any]) -> None:
        """A health event the driver already reported (console, MLflow): the ``metrics.jsonl`` line only."""
        self._write(self.metrics_path, record)

    def rewind(self, step: int) -> None:
        """After a rollback to checkpoint ``step``: drop the later metric lines, keep the event lines."""
        for path, f in list(self._files.items()):
            f.close()
            truncate_jsonl(path, step, keep_events=True)
            self._files[path] = open(path, "a")  # noqa: SIM115 (closed in close())

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        self._write(self.metrics_path, {"step": step, **metrics})
        self.tracker.log_metrics(metrics, step=step)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self.progress.update(force=True)
        self.tracker.close()


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over the data-parallel ranks (one all-reduce; same order on every rank)."""
    import torch.distributed as dist

    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))
