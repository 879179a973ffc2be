"""Two real drivers started together on a fresh workdir, with MLflow tracking on: both succeed, and each
stage (each shard) runs once. Before the tracking store was created under a lock, one of them died in
MLflow's schema migration."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN = textwrap.dedent('''
    import os, time
    from pathlib import Path
    from pipeline import storage
    from pipeline.stage import StrictModel, register

    class ShardsConfig(StrictModel):
        shards: int = 3

    def run(config, ctx):
        for i in range(config.shards):
            marker = ctx.path(f"shard-{i}.done")
            if storage.exists(marker):
                continue
            time.sleep(0.2)
            with Path(os.environ["CALLS_LOG"]).open("a") as f:
                f.write(f"{ctx.name} {i}\\n")
            storage.touch_marker(marker)
        ctx.tracker.log_metrics({"shards": config.shards}, step=1)

    register("shards", ShardsConfig, "1", f"{__name__}:run")
    register("more", ShardsConfig, "1", f"{__name__}:run", consumes=("shards",))
''')


@pytest.mark.slow
def test_two_drivers_on_a_fresh_tracked_workdir_both_succeed(tmp_path):
    (tmp_path / "shardsplugin.py").write_text(PLUGIN)
    env = dict(os.environ, SEEDLINE_STAGE_MODULES="shardsplugin", CALLS_LOG=str(tmp_path / "calls.log"))
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[2])])
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"name: p\nworkdir: {tmp_path / 'w'}\nstages:\n  shards: {{}}\n  more: {{shards: 2}}\n")
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert all("Traceback" not in err for _, err in results)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert sorted(calls) == sorted([f"shards {i}" for i in range(3)] + ["more 0", "more 1"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    exps = [e for e in client.search_experiments() if e.name == "p"]
    assert len(exps) == 1, "both drivers share one experiment"
    runs = client.search_runs([exps[0].experiment_id])
    stage_runs = [r for r in runs if r.data.tags.get("seedline.stage")]
    assert sorted(r.data.tags["seedline.stage"] for r in stage_runs) == ["more", "shards"]
