"""Pipeline core: config errors, fingerprints, skip/resume/re-run, MLflow parent and child runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import stage as registry
from pipeline.config import validate_config
from pipeline.errors import ConfigError
from pipeline.graph import order
from pipeline.runner import run_pipeline
from pipeline.stage import StrictModel, volatile


class CountConfig(StrictModel):
    n: int = 3
    log_every: int = volatile(10)


CALLS: list[str] = []


def count_run(config: CountConfig, ctx) -> None:
    CALLS.append(ctx.name)
    out = Path(ctx.out_dir)
    for i in range(config.n):
        (out / f"{i}.txt").write_text(str(i))
    ctx.tracker.log_metrics({"n": config.n}, step=1)


registry.register("t_a", CountConfig, "1", f"{__name__}:count_run")
registry.register("t_b", CountConfig, "1", f"{__name__}:count_run", consumes=("t_a",))


def cfg(tmp_path, a=3, b=2, every=10, tracking=True):
    return validate_config({
        "name": "p", "workdir": str(tmp_path / "w"), "tracking": {"enabled": tracking},
        "stages": {"t_a": {"n": a, "log_every": every}, "t_b": {"n": b}},
    })


def test_unknown_key_names_path(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\.t_a\.bogus: unknown key"):
        validate_config({"name": "p", "stages": {"t_a": {"bogus": 1}}})


def test_cli_bad_override_exits_2_without_traceback(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: p\nworkdir: w\nstages: {}\n")
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(f), "-s", "ray.num_cpus=-1"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert "ray.num_cpus" in r.stderr and "Traceback" not in r.stderr


def test_cli_version_and_short_help():
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("seedline ")
    for args in (["-h"], ["status", "-h"], ["run", "-h"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0 and "Usage: " in res.output, args


def test_fingerprint_changes_only_for_results(tmp_path):
    base = {n.name: n.fingerprint for n in order(cfg(tmp_path))}
    assert {n.name: n.fingerprint for n in order(cfg(tmp_path, every=99))} == base
    changed = {n.name: n.fingerprint for n in order(cfg(tmp_path, a=4))}
    assert changed["t_a"] != base["t_a"] and changed["t_b"] != base["t_b"]
    only_b = {n.name: n.fingerprint for n in order(cfg(tmp_path, b=5))}
    assert only_b["t_a"] == base["t_a"] and only_b["t_b"] != base["t_b"]


def test_rerun_is_noop_and_change_reruns_dependents(tmp_path):
    CALLS.clear()
    run_pipeline(cfg(tmp_path))
    assert CALLS == ["t_a", "t_b"]
    res = run_pipeline(cfg(tmp_path))
    assert CALLS == ["t_a", "t_b"] and set(res.outcomes.values()) == {"skipped"}
    run_pipeline(cfg(tmp_path, b=7))
    assert CALLS == ["t_a", "t_b", "t_b"]


def test_mlflow_parent_and_children_reattached(tmp_path):
    c = cfg(tmp_path)
    res = run_pipeline(c)
    run_json = json.loads((Path(res.run_dir) / "run.json").read_text())
    client = MlflowClient(c.tracking_uri())
    parent = run_json["mlflow_parent_run_id"]
    exp = client.get_experiment_by_name("p").experiment_id
    # Artifacts (models, charts) stay in the workdir, not in ./mlruns of wherever the command ran.
    assert client.get_experiment(exp).artifact_location.endswith(str(tmp_path / "w" / "mlartifacts"))
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags["seedline.stage"] for r in children) == ["t_a", "t_b"]
    # Simulate an interrupted t_b and resume: the same child run is reused.
    sdir = Path(res.stage_dirs["t_b"])
    st = json.loads((sdir / "status.json").read_text())
    st["state"] = "running"
    (sdir / "status.json").write_text(json.dumps(st))
    run_pipeline(c)
    again = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(again) == 2
    assert json.loads((sdir / "status.json").read_text())["mlflow_run_id"] == st["mlflow_run_id"]
    assert os.path.exists(sdir / "0.txt")


def test_a_verdict_says_whether_its_stage_improved_its_target():
    from pipeline.stage import Verdict
    from pipeline.summary import describe

    assert Verdict("loss", 5.5, 3.9, "lower").improved is True
    assert Verdict("accuracy", 0.4, 0.3, "higher").improved is False
    assert Verdict("train tokens", None, 486140).improved is None
    line = describe(Verdict("documents", 1359, 1213, "", "130 exact"))
    assert line == "documents 1,359 -> 1,213 (130 exact)"
    assert describe(Verdict("train tokens", None, 486140)) == "train tokens 486,140"
