"""Helpers of the multinode tests: the ``seedline`` command against the local cluster, the job and
State APIs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cluster.local_cluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]
SEEDLINE = str(Path(sys.executable).parent / "seedline")


def seedline(c: LocalCluster, *args: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    """The ``seedline`` command as a user runs it against the cluster (token, address, S3 settings)."""
    return subprocess.run([SEEDLINE, *args], env=c.env() | env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


def job_id(out: str) -> str:
    return out.strip().splitlines()[-1]


def api(c: LocalCluster, path: str) -> dict:
    req = urllib.request.Request(f"{c.dashboard}{path}", headers={"Authorization": f"Bearer {c.token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def train_worker_nodes(c: LocalCluster, submission_id: str) -> list[list[str]]:
    """The node names of each training worker group the job started (State API), groups in start order.
    A worker group is one placement group (Ray Train reserves one per group start)."""
    ray_job = api(c, f"/api/jobs/{submission_id}")["job_id"]
    query = ("/api/v0/actors?limit=1000&detail=true&filter_keys=class_name&filter_predicates=%3D"
             "&filter_values=RayTrainWorker")
    actors = [a for a in api(c, query)["data"]["result"]["result"] if a.get("job_id") == ray_job]
    names = c.node_of_resource()
    groups: dict[str, list[dict]] = {}
    for a in actors:
        groups.setdefault(a.get("placement_group_id") or a["actor_id"], []).append(a)
    ordered = sorted(groups.values(), key=lambda g: min(a.get("start_time") or 0 for a in g))
    return [sorted(names.get(a["node_id"], a["node_id"]) for a in g) for g in ordered]


def wait_until(pred, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
