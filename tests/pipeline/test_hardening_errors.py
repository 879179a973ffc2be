"""A stage that fails in a Ray task, with credentials in its config: the terminal gets one line (the cause
and where error.txt is), error.txt the whole traceback without colour codes, status.json a one-line
error, and no file under the workdir (MLflow's database included) nor anything printed holds a secret."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SECRET = "s3cr3t-Pa55"
URL = f"http://alice:{SECRET}@data.example.invalid/corpus/*.jsonl"

# A project stage that fails the way a full disk fails a Ray task: OSError(ENOSPC) raised remotely.
PLUGIN = textwrap.dedent('''
    import errno
    from pipeline.stage import StrictModel, register

    class LeakyConfig(StrictModel):
        source: str
        api_token: str
        note: str = "ok"

    def run(config, ctx):
        ctx.logger.info("reading %s", config.source)
        ctx.init_ray()
        import ray

        @ray.remote
        def write_shard(source):
            raise OSError(errno.ENOSPC, f"No space left on device while caching {source}")

        ray.get(write_shard.remote(config.source))

    register("leaky", LeakyConfig, "1", f"{__name__}:run")
''')


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "leakyplugin.py").write_text(PLUGIN)
    env = dict(os.environ, SEEDLINE_STAGE_MODULES="leakyplugin", RAY_COLOR_PREFIX="1", FORCE_COLOR="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[2])])
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leaky")
    env = _env(tmp)
    cfg = tmp / "p.yaml"
    cfg.write_text(f"name: p\nworkdir: {tmp / 'w'}\nray: {{num_cpus: 1}}\n"
                   f"stages:\n  leaky:\n    source: '{URL}'\n    api_token: tok-{SECRET}\n"
                   f"    note: 'password={SECRET}'\n")
    res = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg)], env=env, capture_output=True,
                         text=True, timeout=300)
    run_dir = tmp / "w" / "p"
    status = subprocess.run([sys.executable, "-m", "pipeline", "status", str(run_dir)], env=env,
                            capture_output=True, text=True, timeout=60)
    status_json = subprocess.run([sys.executable, "-m", "pipeline", "status", str(run_dir), "--json"],
                                 env=env, capture_output=True, text=True, timeout=60)
    return tmp, res, status, status_json


@pytest.mark.slow
def test_stage_error_is_one_line_and_the_traceback_goes_to_error_txt(failed_run):
    tmp, res, _, status_json = failed_run
    assert res.returncode == 1
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "\x1b[" not in res.stderr
    assert "OSError" in errors[0] and "No space left on device" in errors[0] and "error.txt" in errors[0]
    error_txt = Path(errors[0].rsplit("details: ", 1)[1].rstrip(")"))
    details = error_txt.read_text()
    assert "Traceback" in details and "No space left on device" in details and "write_shard" in details
    assert "\x1b" not in details
    status = json.loads((error_txt.parent / "status.json").read_text())
    assert status["state"] == "failed"
    assert "\x1b" not in status["error"] and "\n" not in status["error"]
    assert status["error"].startswith("OSError: [Errno 28] No space left on device")
    row = json.loads(status_json.stdout)[0]
    assert row["state"] == "failed" and row["error"] == status["error"]


@pytest.mark.slow
def test_credentials_reach_no_file_and_no_output(failed_run):
    tmp, res, status, status_json = failed_run
    for text in (res.stdout, res.stderr, status.stdout, status.stderr, status_json.stdout):
        assert SECRET not in text
    assert "alice" not in status_json.stdout
    written = [p for p in (tmp / "w").rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"run.json", "config.json", "status.json", "error.txt", "mlflow.db"} <= names, names
    leaks = [str(p) for p in written if SECRET.encode() in p.read_bytes()]
    assert not leaks, f"credentials written to {leaks}"
    stage_config = json.loads(next((tmp / "w").rglob("config.json")).read_text())
    assert stage_config["source"] == "http://***:***@data.example.invalid/corpus/*.jsonl"
    assert stage_config["api_token"] == "***" and stage_config["note"] == "password=***"


def test_a_redacted_run_json_is_not_resumed_with_masked_values(tmp_path):
    run_dir = tmp_path / "w" / "p"
    run_dir.mkdir(parents=True)
    config = {"name": "p", "workdir": str(tmp_path / "w"), "stages": {"dedupe": {"input": "http://***:***@h/x"}}}
    (run_dir / "run.json").write_text(json.dumps({"config": config}))
    res = subprocess.run([sys.executable, "-m", "pipeline", "resume", str(run_dir)], env=_env(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "stages.dedupe.input" in res.stderr and "seedline run CONFIG" in res.stderr
