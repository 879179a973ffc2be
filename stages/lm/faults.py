"""Fault injection for the trainer's tests: every hook in one place, each armed by an environment variable
read once by the driver (``from_env``) and passed to the workers in the loop config.

- ``SEEDLINE_TRAIN_KILL_AT_STEP=N``: the driver process exits hard (137) once checkpoint ``step-N`` is
  complete (a killed ``seedline run``; the workers sleep so nothing newer is written);
- ``SEEDLINE_TRAIN_FAIL_WORKER_AT_STEP=N``: rank 1 exits once after step N (a lost node; Ray Train
  replaces the worker group);
- ``SEEDLINE_TRAIN_FREEZE_WORKER_AT_STEP=N``: rank 1 stops itself (SIGSTOP) once after step N (a hung
  worker: only the stall watchdog notices);
- ``SEEDLINE_TRAIN_HOLD_AT_STEP=N``: every rank pauses for ``HOLD_S`` seconds once checkpoint ``step-N``
  is saved (a test then kills a node or the driver at a known point: the run cannot race past it, and a
  restarted group resumes from ``step-N``, after which nothing saves ``step-N`` again);
- ``SEEDLINE_TRAIN_TRACE_DIR=DIR``: not a fault but a probe: every rank appends the sample indices of each
  training micro-batch to ``DIR/world-<w>-rank-<r>-pid-<pid>.jsonl`` (``{"step", "rows"}``; one file per
  worker process), so a test can check that a resume (at any worker count) skips no sample and repeats none.

Each worker-side hook fires once per stage directory (a flag file there), so the restarted group runs on.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

from pipeline import storage

KILL_ENV = "SEEDLINE_TRAIN_KILL_AT_STEP"
FAIL_WORKER_ENV = "SEEDLINE_TRAIN_FAIL_WORKER_AT_STEP"
FREEZE_WORKER_ENV = "SEEDLINE_TRAIN_FREEZE_WORKER_AT_STEP"
HOLD_ENV = "SEEDLINE_TRAIN_HOLD_AT_STEP"
HOLD_S = 120.0
TRACE_ENV = "SEEDLINE_TRAIN_TRACE_DIR"
_ENV = {"kill_at": KILL_ENV, "fail_worker_at": FAIL_WORKER_ENV, "freeze_worker_at": FREEZE_WORKER_ENV,
        "hold_at": HOLD_ENV}


def from_env() -> dict[str, Any]:
    """The armed hooks (driver side): name -> step (or the trace directory)."""
    hooks: dict[str, Any] = {key: int(os.environ[env]) for key, env in _ENV.items() if os.environ.get(env)}
    if os.environ.get(TRACE_ENV):
        hooks["trace_dir"] = os.environ[TRACE_ENV]
    return hooks


def trace_batch(hooks: dict[str, Any], rank: int, world: int, step: int, rows: Any) -> None:
    """Worker side, after taking a training micro-batch for optimizer step ``step``: record its rows."""
    if "trace_dir" not in hooks:
        return
    path = os.path.join(hooks["trace_dir"], f"world-{world}-rank-{rank}-pid-{os.getpid()}.jsonl")
    os.makedirs(hooks["trace_dir"], exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "rows": [int(r) for r in rows]}) + "\n")


def arm_driver(hooks: dict[str, Any], ckpt_dir: str) -> None:
    """Driver side: exit this process hard once the checkpoint of ``kill_at`` is complete."""
    if "kill_at" not in hooks:
        return
    marker = storage.join(ckpt_dir, f"step-{hooks['kill_at']}", "complete.json")
    existed = storage.exists(marker)
    pause = 0.2 if storage.is_url(marker) else 0.05

    def watch():
        while True:
            if storage.exists(marker) and not existed:
                os._exit(137)
            time.sleep(pause)

    threading.Thread(target=watch, name="seedline-kill-hook", daemon=True).start()


def after_step(hooks: dict[str, Any], rank: int, world: int, step: int, out_url: str) -> None:
    """Worker side, after optimizer step ``step``: the rank-1 hooks."""
    if rank != min(1, world - 1):
        return
    if hooks.get("fail_worker_at") == step and _first_time(out_url, f"failed-worker-at-{step}"):
        os._exit(1)
    if hooks.get("freeze_worker_at") == step and _first_time(out_url, f"froze-worker-at-{step}"):
        os.kill(os.getpid(), signal.SIGSTOP)


def after_save(hooks: dict[str, Any], step: int) -> None:
    """Worker side, after checkpoint ``step`` is saved: wait for the driver's hard exit (``kill_at``), or
    hold still while a test kills something (``hold_at``)."""
    if hooks.get("kill_at") == step:
        time.sleep(3600)
    if hooks.get("hold_at") == step:
        time.sleep(HOLD_S)


def _first_time(out_url: str, name: str) -> bool:
    flag = storage.join(out_url, name)
    if storage.exists(flag):
        return False
    storage.write_text(flag, f"{name}: a fault injected on purpose (stages/lm/faults.py)\n")
    return True
