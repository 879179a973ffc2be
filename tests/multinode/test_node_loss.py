"""Losing a machine and a driver on the 3-node cluster, through ``seedline submit`` / ``resume``, with the
run on S3: a worker node SIGKILLed mid-pretrain (its whole process group) is replaced and the stage
resumes from the newest complete checkpoint to the same per-step losses; with no replacement, an elastic
stage (``num_workers: {min: 1, max: 2}``) goes on with one worker on the node left, every step taking
exactly the rows of the uninterrupted run; a driver killed mid-stage is resumed with
``seedline resume s3://... --address``.

The trainer's trace probe (``SEEDLINE_TRAIN_TRACE_DIR``, ``stages/lm/faults.py``) records every
micro-batch's rows; the nodes share this machine's disk, so the test reads them directly. Each failure
strikes while the workers hold still after the first checkpoint (``SEEDLINE_TRAIN_HOLD_AT_STEP``): eight
tiny steps take a second, so without the hold a fast run could finish before the kill lands."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from demo_settings import CONFIG, as_args, small_overrides
from multinode_helpers import api, job_id, seedline, wait_until

from pipeline import storage
from pipeline.state import recorded_stage_dirs

# Only what pretrain needs: tokenize reads the corpus itself (dedupe, ~17 s a run on this cluster, is
# covered by the demo tests).
DROPPED = ("dedupe", "sft", "dpo", "evaluate")
HOLD = {"SEEDLINE_TRAIN_HOLD_AT_STEP": "2"}  # the first checkpoint (checkpoint.every: 2)
LONGER = ["stages.pretrain.train={steps: 8, micro_batch: 2, lr: 3.0e-3, min_lr: 3.0e-4, warmup: 1}"]


def _overrides(demo_data, workdir: str, tracking: str, *extra: str) -> list[str]:
    kept = [o for o in small_overrides(demo_data, workdir, tracking)
            if not o.startswith(tuple(f"stages.{s}." for s in DROPPED))]
    return kept + [f"stages.tokenize.input={demo_data}/corpus/*.jsonl.gz"] + LONGER + list(extra)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> str:
    """configs/tiny.yaml's tokenize and pretrain."""
    data = yaml.safe_load(CONFIG.read_text())
    for stage in DROPPED:
        del data["stages"][stage]
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _stage_dir(run_dir: str, stage: str) -> str | None:
    """The stage's directory in the workdir's store (run.json), once the run recorded it."""
    if not storage.exists(storage.join(run_dir, "run.json")):
        return None
    return recorded_stage_dirs(run_dir).get(stage)


def _complete_steps(run_dir: str) -> list[int]:
    d = _stage_dir(run_dir, "pretrain")
    if d is None:
        return []
    try:
        found = storage.glob(f"{d}/checkpoints/step-*/complete.json")
    except FileNotFoundError:  # keep-last-k removed a checkpoint while the glob listed it: poll again
        return []
    return sorted(int(p.split("/step-")[1].split("/")[0]) for p in found)


def _losses(run_dir: str) -> dict[int, float]:
    text = storage.read_text(f"{_stage_dir(run_dir, 'pretrain')}/metrics.jsonl")
    rows = [json.loads(line) for line in text.splitlines() if line]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _status(cluster3, job: str) -> str:
    return api(cluster3, f"/api/jobs/{job}")["status"]


def _trace_file(f: Path) -> list[tuple[str, int, list[int]]]:
    return [(f.name, r["step"], r["rows"]) for r in map(json.loads, f.read_text().splitlines())]


def _trace(trace: Path) -> list[tuple[str, int, list[int]]]:
    """``(file, step, rows)`` of every traced micro-batch, in the order each file was written."""
    return [ln for f in sorted(trace.glob("*.jsonl")) for ln in _trace_file(f)]


def _rows_by_step(lines: list[tuple[str, int, list[int]]]) -> dict[int, list[int]]:
    steps: dict[int, list[int]] = {}
    for _, step, rows in lines:
        steps.setdefault(step, []).extend(rows)
    return {s: sorted(r) for s, r in steps.items()}


@pytest.fixture(scope="module")
def uninterrupted(cluster3, demo_data, config, tmp_path_factory) -> dict:
    """Per-step pretrain losses and rows of the same config without any failure."""
    run_dir = "s3://seedline/straight/tiny"
    trace = tmp_path_factory.mktemp("trace-straight")
    sub = seedline(cluster3, "submit", config,
                   *as_args(_overrides(demo_data, "s3://seedline/straight", cluster3.mlflow_uri)),
                   SEEDLINE_TRAIN_TRACE_DIR=str(trace))
    assert sub.returncode == 0, sub.stderr
    follow = seedline(cluster3, "logs", job_id(sub.stdout), "--follow")
    assert follow.returncode == 0, follow.stdout[-4000:]
    return {"losses": _losses(run_dir), "rows": _rows_by_step(_trace(trace))}


def _training_again(trace: Path, resumed_from: int, killed_at: float) -> float:
    """Seconds from the kill until a new worker group trains again: a micro-batch of the step after the
    checkpoint it resumed from, traced by a worker process that started after the kill (one file each)."""
    old = {f.name for f in trace.glob("*.jsonl")}

    def again() -> bool:
        return any(step == resumed_from + 1 for f in trace.glob("*.jsonl") if f.name not in old
                   for _, step, _ in _trace_file(f))

    wait_until(again, 600, "training to start again", poll=0.2)
    return time.monotonic() - killed_at


def _lose_a_node(cluster3, demo_data, config, name: str, scaling: str, trace: Path, kill: str,
                 replacement: str | None = None) -> dict:
    """Submit pretrain with ``scaling`` to ``s3://seedline/<name>``, SIGKILL node ``kill`` once a complete
    checkpoint is on S3 (starting ``replacement`` if given), wait for the job; what happened, timed."""
    run_dir = f"s3://seedline/{name}/tiny"
    sub = seedline(cluster3, "submit", config,
                   *as_args(_overrides(demo_data, f"s3://seedline/{name}", cluster3.mlflow_uri,
                                       f"stages.pretrain.scaling={scaling}")),
                   SEEDLINE_TRAIN_TRACE_DIR=str(trace), **HOLD)
    assert sub.returncode == 0, sub.stderr
    job = job_id(sub.stdout)
    resumed_from = wait_until(lambda: _complete_steps(run_dir), 600, "a complete pretrain checkpoint on S3",
                              poll=0.3)[-1]
    assert resumed_from == int(HOLD["SEEDLINE_TRAIN_HOLD_AT_STEP"])
    killed_at = time.monotonic()
    cluster3.kill_node(kill)
    if replacement:
        cluster3.start_node(replacement)
    again = _training_again(trace, resumed_from, killed_at)
    wait_until(lambda: _status(cluster3, job) in ("SUCCEEDED", "FAILED", "STOPPED"), 900, "the job to end")
    logs = seedline(cluster3, "logs", job).stdout
    assert _status(cluster3, job) == "SUCCEEDED", logs[-4000:]
    return {"run_dir": run_dir, "resumed_from": resumed_from, "again": again,
            "done": time.monotonic() - killed_at}


def test_lost_worker_node_is_replaced_and_pretrain_losses_match(cluster3, demo_data, config, uninterrupted,
                                                                tmp_path):
    lost = _lose_a_node(cluster3, demo_data, config, "nodeloss",
                        "{num_workers: 2, cpus_per_worker: 1, max_failures: 2, resources: {trainer: 1}}",
                        tmp_path / "trace", kill="w2", replacement="w3")
    assert _losses(lost["run_dir"]) == uninterrupted["losses"]
    print(f"\nnode loss, replaced: killed w2 after checkpoint step-{lost['resumed_from']}; training again "
          f"{lost['again']:.1f}s later, job done {lost['done']:.1f}s later")


def test_lost_worker_node_without_replacement_goes_on_elastic(cluster3, demo_data, config, uninterrupted,
                                                              tmp_path):
    """No machine replaces the lost one: the stage restarts on the one node left with one worker, which
    accumulates two micro-batches per step (same global batch), resharding the ZeRO-2 checkpoint."""
    trace = tmp_path / "trace"
    node = "w3" if "w3" in cluster3.nodes else "w2"  # a worker node the previous test left running
    lost = _lose_a_node(cluster3, demo_data, config, "elastic",
                        "{num_workers: {min: 1, max: 2}, cpus_per_worker: 1, max_failures: 2, "
                        "resources: {trainer: 1}}", trace, kill=node)
    run_dir, resumed_from = lost["run_dir"], lost["resumed_from"]
    lines = _trace(trace)
    one = [ln for ln in lines if ln[0].startswith("world-1-")]
    assert one and min(s for _, s, _ in one) == resumed_from + 1, "no 1-worker attempt resumed"
    # every step took exactly the rows the uninterrupted run took: none skipped, none twice
    before = [ln for ln in lines if ln[0].startswith("world-2-") and ln[1] <= resumed_from]
    final = _rows_by_step(before + one)
    assert final == uninterrupted["rows"]
    losses, straight = _losses(run_dir), uninterrupted["losses"]
    assert sorted(losses) == sorted(straight)
    assert all(losses[s] == straight[s] for s in straight if s <= resumed_from)
    assert [losses[s] for s in sorted(straight)] == pytest.approx([straight[s] for s in sorted(straight)],
                                                                  rel=1e-4)
    print(f"\nnode loss, elastic: killed {node} after checkpoint step-{resumed_from}; training again on one "
          f"worker {lost['again']:.1f}s later, job done {lost['done']:.1f}s later")


def _driver_pid(cluster3, job: str) -> int | None:
    info = api(cluster3, f"/api/jobs/{job}")
    return (info.get("driver_info") or {}).get("pid") and int(info["driver_info"]["pid"])


def test_driver_killed_mid_stage_is_resumed_from_s3(cluster3, demo_data, config, uninterrupted):
    run_dir = "s3://seedline/driverkill/tiny"
    sub = seedline(cluster3, "submit", config,
                   *as_args(_overrides(demo_data, "s3://seedline/driverkill", cluster3.mlflow_uri)),
                   SEEDLINE_LEASE_TTL="3", **HOLD)
    assert sub.returncode == 0, sub.stderr
    job = job_id(sub.stdout)
    wait_until(lambda: _complete_steps(run_dir), 600, "a complete pretrain checkpoint on S3", poll=0.3)
    # The job's entrypoint runs in a shell; the driver is the `seedline run` process under it.
    shell = wait_until(lambda: _driver_pid(cluster3, job), 60, "the driver's pid")
    import psutil

    for proc in [psutil.Process(shell), *psutil.Process(shell).children(recursive=True)]:
        if "seedline" in " ".join(proc.cmdline()):
            os.kill(proc.pid, signal.SIGKILL)
    wait_until(lambda: _status(cluster3, job) in ("FAILED", "STOPPED", "SUCCEEDED"), 120, "the job to end")
    assert _status(cluster3, job) != "SUCCEEDED"  # it was killed mid-stage, not after
    resumed = seedline(cluster3, "resume", run_dir, "--address", cluster3.dashboard, SEEDLINE_LEASE_TTL="3")
    assert resumed.returncode == 0, resumed.stderr
    again = job_id(resumed.stdout)
    follow = seedline(cluster3, "logs", again, "--follow")
    assert follow.returncode == 0, follow.stdout[-4000:]
    assert "pretrain: resuming" in follow.stdout or "resum" in follow.stdout
    assert _losses(run_dir) == uninterrupted["losses"]
    statuses = [storage.read_json(storage.join(d, "status.json"))["state"]
                for d in recorded_stage_dirs(run_dir).values()]
    assert statuses and set(statuses) == {"succeeded"}
