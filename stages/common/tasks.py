"""Per-key Ray tasks with completion markers: the resumable fan-out every data stage uses.

A key's result is its marker (a small JSON stats dict written by the task itself, last); a key with a
marker is not run again, so a killed stage resumes with only the unfinished keys.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from typing import Any

from pipeline import storage
from pipeline.stage import StageContext


def kill_after(env_var: str, step: str) -> int | None:
    """Test hook: ``ENV=step:N`` makes the driver exit hard after N tasks of ``step`` finished."""
    name, _, n = os.environ.get(env_var, "").partition(":")
    return int(n) if name == step and n else None


def run_keyed_tasks(ctx: StageContext, step: str, keys: list[Hashable], marker: Callable[[Any], str],
                    fn: Callable[..., dict[str, Any]], args: Callable[[Any], tuple], *,
                    workers: int | None = None, unit: str = "tasks", kill_env: str = "",
                    ) -> dict[Any, dict[str, Any]]:
    """Run ``fn(*args(key))`` as a Ray task (at most ``workers`` at once) for every key without a marker.

    Returns the stats of every key (read from the markers of keys done earlier). A failing task raises
    with the stage, step and key named.
    """
    import ray

    results: dict[Any, dict[str, Any]] = {}
    for k in keys:
        done = storage.read_json_or(marker(k), None)
        if done is not None:
            results[k] = done
    todo = [k for k in keys if k not in results]
    limit = workers or len(todo) or 1
    task = ray.remote(num_cpus=1)(fn)
    running: dict[Any, Hashable] = {}
    kill, finished = kill_after(kill_env, step) if kill_env else None, 0
    ctx.progress.update(step=step, done=len(results), total=len(keys), unit=unit, force=True)
    while todo or running:
        while todo and len(running) < limit:
            k = todo.pop(0)
            running[task.remote(*args(k))] = k
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            k = running.pop(ref)
            try:
                results[k] = ray.get(ref)
            except Exception as e:
                raise RuntimeError(f"{ctx.name} {step} failed on {k}: {e}") from e
            finished += 1
        ctx.progress.update(step=step, done=len(results), total=len(keys), unit=unit)
        if kill is not None and finished >= kill:
            os._exit(75)
    return results
