"""The whole demo pipeline (configs/tiny.yaml, SMALL settings) through ``seedline submit`` on the 3-node
cluster: with a workdir every node shares (local disk here) and with an ``s3://`` workdir; the training
workers of each stage run on two different nodes, and the S3 run's outputs equal the local one's."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from demo_settings import CONFIG, as_args, small_overrides
from multinode_helpers import job_id, seedline, train_worker_nodes

from pipeline import storage
from pipeline.state import recorded_stage_dirs

STAGES = ("dedupe", "tokenize", "pretrain", "sft", "dpo", "evaluate")


def _submit_and_follow(cluster3, overrides: list[str]) -> dict:
    start = time.monotonic()
    sub = seedline(cluster3, "submit", str(CONFIG), *as_args(overrides))
    assert sub.returncode == 0, sub.stderr
    job = job_id(sub.stdout)
    follow = seedline(cluster3, "logs", job, "--follow")
    return {"job": job, "follow": follow, "seconds": time.monotonic() - start}


@pytest.fixture(scope="module")
def local_demo(cluster3, demo_data, tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("shared") / "runs"
    run = _submit_and_follow(cluster3, small_overrides(demo_data, str(workdir)))
    run["run_dir"] = str(workdir / "tiny")
    print(f"\n3-node demo, shared local workdir: {run['seconds']:.1f}s")
    return run


def _stage_dirs(run_dir: str) -> dict[str, str]:
    """``{stage: its directory in the workdir's store}``, from the run's run.json."""
    return recorded_stage_dirs(run_dir)


def _assert_succeeded(run: dict) -> dict[str, str]:
    follow = run["follow"]
    assert follow.returncode == 0 and "job status: SUCCEEDED" in follow.stderr, \
        follow.stdout[-4000:] + follow.stderr[-2000:]
    dirs = _stage_dirs(run["run_dir"])
    assert set(dirs) == set(STAGES)
    for stage, d in dirs.items():
        assert storage.read_json(storage.join(d, "status.json"))["state"] == "succeeded", stage
    # The job's console: Seedline's lines (the training steps among them), not the workers' raw output,
    # which is in <run>/logs/<stage>.log, from the workers on every node.
    console = follow.stdout
    assert "pretrain: step " in console and "(RayTrainWorker" not in console, console[-4000:]
    assert "(RayTrainWorker" in storage.read_text(storage.join(run["run_dir"], "logs", "pretrain.log"))
    return dirs


def test_demo_pipeline_submitted_to_three_nodes_spreads_training(cluster3, local_demo):
    _assert_succeeded(local_demo)
    groups = train_worker_nodes(cluster3, local_demo["job"])
    assert len(groups) >= 3, groups  # pretrain, sft, dpo (one group each when no worker died)
    for pair in groups:
        assert len(pair) == 2 and pair[0] != pair[1], f"two workers of one stage on one node: {groups}"


def _losses(metrics_path: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in storage.read_text(metrics_path).splitlines() if line]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _tree_bytes(path: str) -> int:
    fs, inner = storage.fs_for(path)
    return sum(info["size"] for info in fs.find(inner, detail=True).values())


def test_demo_pipeline_on_s3_equals_the_local_workdir_run(cluster3, local_demo, demo_data):
    local_dirs = _assert_succeeded(local_demo)
    s3_run = _submit_and_follow(cluster3, small_overrides(demo_data, "s3://seedline/demo",
                                                          tracking_uri=cluster3.mlflow_uri))
    s3_run["run_dir"] = "s3://seedline/demo/tiny"
    s3_dirs = _assert_succeeded(s3_run)
    print(f"\n3-node demo: s3 workdir {s3_run['seconds']:.1f}s, shared local workdir "
          f"{local_demo['seconds']:.1f}s")
    for stage in STAGES:
        io = storage.read_json_or(storage.join(s3_dirs[stage], "stats.json"), {}).get("io") or {}
        moved = (f"; training workers uploaded {io['bytes_uploaded'] / 2**20:.2f} MiB, downloaded "
                 f"{io['bytes_downloaded'] / 2**20:.2f} MiB" if io else "")
        print(f"  {stage}: {_tree_bytes(s3_dirs[stage]) / 2**20:.2f} MiB stored on S3{moved}")
    for stage in ("dedupe", "tokenize"):
        local_files = sorted(Path(local_dirs[stage]).rglob("*"))
        compared = 0
        for f in local_files:
            rel = f.relative_to(local_dirs[stage]).as_posix()
            if rel.startswith("work/"):
                continue  # the sub-steps' markers hold input paths, which differ between workdirs
            if f.suffix in (".parquet", ".arrow") or f.name in ("manifest.json", "tokenizer.json"):
                assert storage.read_bytes(f"{s3_dirs[stage]}/{rel}") == f.read_bytes(), f"{stage}/{rel}"
                compared += 1
        assert compared >= 2, stage
    for stage in ("pretrain", "sft", "dpo"):
        local_losses = _losses(str(Path(local_dirs[stage]) / "metrics.jsonl"))
        assert local_losses and _losses(f"{s3_dirs[stage]}/metrics.jsonl") == local_losses, stage
    for pair in train_worker_nodes(cluster3, s3_run["job"]):
        assert pair[0] != pair[1]
