"""List, follow and stop jobs on a Ray cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cluster.client import translate_errors
from cluster.errors import ClusterError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class JobRow:
    """What ``seedline jobs`` shows of one job."""

    job_id: str
    status: str
    started: float | None
    ended: float | None
    pipeline: str
    entrypoint: str
    message: str


def _row(info: Any) -> JobRow:
    meta = info.metadata or {}
    start = info.start_time / 1000 if info.start_time else None
    end = info.end_time / 1000 if info.end_time else None
    return JobRow(info.submission_id or info.job_id or "?", str(info.status), start, end,
                  meta.get("seedline.pipeline", ""), info.entrypoint or "", info.message or "")


def list_jobs(client: Any) -> list[JobRow]:
    """Submitted jobs (driver-less Ray jobs are left out), oldest first."""
    with translate_errors(client.get_address()):
        infos = client.list_jobs()
    rows = [_row(i) for i in infos if i.submission_id]
    return sorted(rows, key=lambda r: r.started or 0.0)


def status(client: Any, job_id: str) -> str:
    with translate_errors(client.get_address(), job_id):
        return str(client.get_job_status(job_id))


def info(client: Any, job_id: str) -> Any:
    with translate_errors(client.get_address(), job_id):
        return client.get_job_info(job_id)


def logs(client: Any, job_id: str) -> str:
    with translate_errors(client.get_address(), job_id):
        return client.get_job_logs(job_id)


def follow(client: Any, job_id: str, write: Callable[[str], None]) -> str:
    """Stream the job's output to ``write`` until the job ends; its final status."""
    status(client, job_id)  # an unknown job is a clear error, not a hanging websocket

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    with translate_errors(client.get_address(), job_id):
        asyncio.run(_tail())
    return wait(client, job_id, timeout=30)


def wait(client: Any, job_id: str, timeout: float, poll: float = 0.5) -> str:
    """Poll until the job reaches a terminal status; raise ``ClusterError`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        current = status(client, job_id)
        if current in TERMINAL:
            return current
        if time.monotonic() > deadline:
            raise ClusterError(f"job {job_id} is still {current} after {timeout:.0f}s")
        time.sleep(poll)


def stop(client: Any, job_id: str, timeout: float = 60) -> str:
    """Ask Ray to stop the job (SIGTERM, then SIGKILL) and wait for it to end; its final status.

    A job that already ended is left as it is. The stopped run keeps its finished stages and shard
    markers in the run directory, so ``seedline resume`` carries on from there.
    """
    current = status(client, job_id)
    if current in TERMINAL:
        return current
    with translate_errors(client.get_address(), job_id):
        client.stop_job(job_id)
    return wait(client, job_id, timeout)
