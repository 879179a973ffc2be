"""Live health: pace, token rate and loss spikes from progress reports; `seedline status` shows STALLED
and DIVERGING, in pipeline order, under a header naming the run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from pipeline.health import HealthRules, Observer, classify
from pipeline.stage import Progress

REPO = Path(__file__).resolve().parents[2]


def test_pace_and_token_rate_come_from_the_updates():
    state: dict = {}
    obs = Observer(HealthRules())
    for i, t in enumerate([0.0, 1.0, 2.0, 3.5]):
        state |= {"step": i, "tokens": 1000 * i}
        obs.observe(state, {"step": i, "tokens": 1000 * i}, 100 + t)
    assert state["median_step_s"] == 1.0 and state["tokens_per_s"] == round(1000 / 1.5)
    assert state["advanced"] == 103.5


def test_a_frozen_stage_turns_stalled_after_k_median_steps():
    rules = HealthRules(stall_factor=5, stall_min_s=2)
    progress = {"median_step_s": 1.0, "advanced": 1000.0, "health_rules": rules.as_dict()}
    assert classify("running", progress, 1004.0) == "running"
    assert classify("running", progress, 1006.0) == "stalled"
    assert classify("succeeded", progress, 9999.0) == "succeeded"  # only a running stage stalls
    slow = progress | {"health_rules": HealthRules(stall_factor=5, stall_min_s=60).as_dict()}
    assert classify("running", slow, 1030.0) == "running"  # never before stall_min_s


def test_training_that_froze_before_a_step_time_was_written_stalls_after_stall_min_s():
    rules = HealthRules(stall_min_s=8).as_dict()
    progress = {"advanced": 1000.0, "step": 1, "unit": "steps", "health_rules": rules}  # no median yet
    assert classify("running", progress, 1007.0) == "running"
    assert classify("running", progress, 1009.0) == "stalled"
    data_stage = {"updated": 1000.0, "done": 0, "unit": "shards", "health_rules": rules}
    assert classify("running", data_stage, 1100.0) == "running"  # no pace known: no verdict


def test_a_loss_spike_for_n_steps_is_diverging_and_one_outlier_is_not():
    obs = Observer(HealthRules(spike_factor=2.0, spike_steps=3, warmup_steps=5))
    state: dict = {}
    for loss in [3.0, 2.9, 2.8, 2.9, 2.8, 2.7, 9.0, 2.7]:  # one outlier
        obs.observe(state, {"loss": loss}, 0.0)
    assert state["diverging"] is False and state["spike_run"] == 0
    for loss in [8.0, 9.0, 10.0]:
        obs.observe(state, {"loss": loss}, 0.0)
    assert state["diverging"] is True and state["spike_run"] == 3
    assert classify("running", state, 0.0) == "diverging"


def test_progress_pickles_with_its_rules():
    import pickle

    p = Progress(None, rules=HealthRules(stall_factor=3))
    p.update(step=1, loss=2.0)
    q = pickle.loads(pickle.dumps(p))
    assert q.rules.stall_factor == 3 and q.state == {}
    q.update(step=2, loss=2.0)
    assert q.state["health_rules"]["stall_factor"] == 3


def _run_with_a_frozen_stage(tmp_path: Path) -> Path:
    """A run directory as the runner leaves it while stage b runs but stopped reporting 120 s ago."""
    work = tmp_path / "w"
    run = work / "r"
    store = work / "store"
    now = time.time()
    dirs = {"a": "t_a-1111111111", "b": "t_b-2222222222"}
    for d in dirs.values():
        (store / d).mkdir(parents=True)
    (store / dirs["a"] / "status.json").write_text(json.dumps(
        {"state": "succeeded", "started": now - 300, "finished": now - 200}))
    (store / dirs["b"] / "status.json").write_text(json.dumps({"state": "running", "started": now - 190}))
    (store / dirs["b"] / "lease.json").write_text(json.dumps({"owner": "x", "heartbeat": now}))
    (store / dirs["b"] / "progress.json").write_text(json.dumps({
        "step": 28, "total": 60, "loss": 3.21, "tokens_per_s": 5000,
        "updated": now - 120, "advanced": now - 120,
        "median_step_s": 2.0, "health_rules": HealthRules(stall_factor=10, stall_min_s=30).as_dict()}))
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"stages": {k: f"store/{v}" for k, v in dirs.items()},
                                              "order": ["a", "b"]}))
    return run


def test_status_shows_stalled_in_pipeline_order_with_a_header(tmp_path):
    run = _run_with_a_frozen_stage(tmp_path)
    out = subprocess.run([sys.executable, "-m", "pipeline", "status", str(run), "--json"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert [r["stage"] for r in rows] == ["a", "b"]
    assert rows[1]["state"] == "stalled" and rows[1]["updated_ago_s"] >= 119 and rows[1]["loss"] == 3.21
    table = subprocess.run([sys.executable, "-m", "pipeline", "status", str(run)], cwd=REPO, text=True,
                           capture_output=True, check=True, env={"COLUMNS": "160", "PATH": ""}).stdout
    assert table.splitlines()[0].startswith("run r") and "STALLED" in table and "ago" in table
