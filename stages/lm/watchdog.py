"""The stall watchdog of a training stage (``health.on_stall``).

Every worker runs a heartbeat thread that tells a small Ray actor (``Heartbeats``, made by the driver)
its rank, process, node and current step once a second. A worker that is frozen or hung entirely (its
threads stop too) falls silent; a worker stuck in a collective keeps beating but its step stops. The
driver's ``StallWatch`` thread judges both against the stage's ``health`` thresholds: no heartbeat, or no
step advance on any rank, for ``stall_factor`` median step times (at least ``stall_min_s``) is a stall.
It is logged to the console, tagged and counted in MLflow, handed to rank 0 for ``metrics.jsonl``, and
with ``on_stall: fail`` the stalled worker's process is killed (a task pinned to its node), so Ray Train
replaces the group and it resumes from the newest checkpoint (``scaling.max_failures``).

A rank is judged only after it advanced once in its current process: start-up and checkpoint loading
are not stalls.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import threading
import time
from typing import Any

import ray

BEAT_S = 1.0


@ray.remote(num_cpus=0)
class Heartbeats:
    """Last heartbeat per rank, and stall events waiting for rank 0's ``metrics.jsonl``."""

    def __init__(self):
        self.beats: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []

    def beat(self, rank: int, info: dict[str, Any]) -> None:
        self.beats[rank] = {**info, "at": time.time()}

    def snapshot(self) -> tuple[dict[int, dict[str, Any]], float]:
        return dict(self.beats), time.time()

    def add_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def take_events(self) -> list[dict[str, Any]]:
        out, self.events = self.events, []
        return out


class HeartbeatSender:
    """Worker side: a daemon thread beating every ``BEAT_S`` with the step reached (``advance``), the step
    this process started from and its median step time."""

    def __init__(self, actor: Any, rank: int, step: int):
        self.actor, self.rank, self.step, self.start = actor, rank, step, step
        self.step_times: list[float] = []
        self.node = ray.get_runtime_context().get_node_id()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="seedline-heartbeat", daemon=True).start()

    def advance(self, step: int, seconds: float) -> None:
        """The main loop reached ``step`` after ``seconds``; beats at once (a freeze just after is named)."""
        self.step = step
        self.step_times = (self.step_times + [seconds])[-64:]
        self._beat()

    def _beat(self) -> None:
        median = statistics.median(self.step_times) if self.step_times else None
        self.actor.beat.remote(self.rank, {"step": self.step, "start": self.start, "median_step_s": median,
                                           "pid": os.getpid(), "node": self.node})

    def _run(self) -> None:
        while not self._stop.is_set():
            self._beat()
            self._stop.wait(BEAT_S)

    def stop(self) -> None:
        self._stop.set()


@ray.remote(num_cpus=0)
def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)  # also ends a SIGSTOPped process


class StallJudge:
    """The stall rule over heartbeat snapshots (no Ray): which ranks newly count as stalled, and why."""

    def __init__(self, health: Any, stage: str):
        self.health, self.stage = health, stage
        self.seen: dict[int, tuple[int, int, float]] = {}  # rank -> (pid, step, first seen at)
        self.reported: set[tuple[int, int, int]] = set()  # (rank, pid, step)

    def check(self, beats: dict[int, dict[str, Any]], now: float) -> list[tuple[int, dict[str, Any], str]]:
        """Fold one snapshot in; ``(rank, its beat, message)`` of each stall not reported before."""
        for rank, b in beats.items():
            prev = self.seen.get(rank)
            if prev is None or prev[:2] != (b["pid"], b["step"]):
                self.seen[rank] = (b["pid"], b["step"], now)
        # judged: ranks that made a step in their current process (not starting up or loading a checkpoint)
        judged = {r: b for r, b in beats.items() if b["step"] > b["start"] and b["median_step_s"]}
        if not judged:
            return []
        limit = max(self.health.stall_factor * max(b["median_step_s"] for b in judged.values()),
                    self.health.stall_min_s)
        silent = [r for r, b in judged.items() if now - b["at"] > limit]
        stuck = len(judged) == len(beats) and all(now - self.seen[r][2] > limit for r in judged)
        out = []
        for rank in silent or (sorted(judged) if stuck else []):
            b = beats[rank]
            if (rank, b["pid"], b["step"]) in self.reported:
                continue
            self.reported.add((rank, b["pid"], b["step"]))
            how = (f"sent no heartbeat for {now - b['at']:.0f} s" if silent else
                   f"made no step for {now - self.seen[rank][2]:.0f} s")
            msg = (f"{self.stage}: stalled: rank {rank} (pid {b['pid']}) {how} after step {b['step']} "
                   f"(limit {limit:.0f} s: health.stall_factor x median step time, at least stall_min_s)")
            if self.health.on_stall == "fail":
                msg += ("; health.on_stall: fail: killing it, so Ray Train restarts the workers from the "
                        "newest checkpoint")
            out.append((rank, b, msg))
        return out


class StallWatch:
    """Driver side: judges the heartbeats once a second until ``stop``; logs, records and acts."""

    def __init__(self, actor: Any, health: Any, stage: str, tracker: Any, logger: logging.Logger):
        self.actor, self.health, self.stage = actor, health, stage
        self.tracker, self.logger = tracker, logger
        self.judge = StallJudge(health, stage)
        self.stalls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="seedline-stall-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                beats, now = ray.get(self.actor.snapshot.remote(), timeout=30)
            except Exception as e:  # the watchdog must never take the stage down; say why it is blind
                self.logger.warning("%s: stall watchdog could not read heartbeats: %s", self.stage, e)
                continue
            for rank, beat, msg in self.judge.check(beats, now):
                self._act(rank, beat, msg)

    def _act(self, rank: int, b: dict[str, Any], msg: str) -> None:
        self.stalls += 1
        self.logger.warning("%s", msg)
        self.tracker.set_tags({"health.stall": msg})
        self.tracker.log_metrics({"health/stall": float(self.stalls)}, step=b["step"])
        self.actor.add_event.remote({"step": b["step"], "event": "stall", "rank": rank, "message": msg})
        if self.health.on_stall == "fail":
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            pinned = NodeAffinitySchedulingStrategy(b["node"], soft=False)
            _kill.options(scheduling_strategy=pinned).remote(b["pid"])
