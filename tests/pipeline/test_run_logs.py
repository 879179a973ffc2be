"""`seedline run` as a user sees it: Seedline's lines on the console, everything else in <run>/logs/.

A project stage (loaded through SEEDLINE_STAGE_MODULES) makes the noise real runs make: print() and a raw
write to file descriptor 2 in the driver, a third-party logger, a C-level child process, and Ray tasks
printing on their workers, one of them with a line marked for the console (as the training step lines
are)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PLUGIN = textwrap.dedent('''
    import logging, os, subprocess, sys
    from pipeline import storage
    from pipeline.stage import StrictModel, register

    class NoisyConfig(StrictModel):
        ray: bool = True

    def run(config, ctx):
        ctx.logger.info("%s: doing the work", ctx.name)
        print("\\x1b[33mprinted by a library\\x1b[0m", flush=True)
        os.write(2, b"written to fd 2 by C code\\n")
        logging.getLogger("mlflow.store").info("INFO from a third-party logger")
        subprocess.run(["sh", "-c", "echo from a child process >&2"], check=True)
        if config.ray:
            ctx.init_ray()
            import ray

            @ray.remote
            def chatty(i):
                print(f"worker noise {i}", flush=True)
                return i

            @ray.remote
            def reporter():
                from pipeline.run_logs import mark_worker_logs
                mark_worker_logs()
                logging.getLogger("seedline.noisy").info("noisy: step 1/1 from a worker")
                print("worker noise beside it", flush=True)
                return True

            assert ray.get([chatty.remote(i) for i in range(3)]) == [0, 1, 2]
            assert ray.get(reporter.remote())
            import time
            time.sleep(2)  # Ray forwards worker output about once a second
        storage.write_json(ctx.path("done.json"), {"ok": True})

    register("noisy", NoisyConfig, "1", f"{__name__}:run")
''')

NOISE = ("printed by a library", "written to fd 2", "INFO from a third-party logger", "from a child process")


def _run(tmp_path: Path, *flags: str, ray: bool = True) -> tuple[subprocess.CompletedProcess, Path]:
    (tmp_path / "noisyplugin.py").write_text(PLUGIN)
    env = dict(os.environ, SEEDLINE_STAGE_MODULES="noisyplugin")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
    env.pop("RAY_ADDRESS", None)
    cfg = tmp_path / "noisy.yaml"
    cfg.write_text(f"name: noisy\nworkdir: {tmp_path / 'w'}\ntracking: {{enabled: false}}\n"
                   f"ray: {{num_cpus: 2}}\nstages:\n  noisy: {{ray: {str(ray).lower()}}}\n")
    res = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg), *flags], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res, tmp_path / "w" / "noisy" / "logs"


@pytest.mark.slow
def test_console_shows_seedline_lines_and_the_stage_log_holds_the_rest(tmp_path):
    res, logs = _run(tmp_path)
    console = res.stderr
    assert "noisy: doing the work" in console
    assert "noisy: step 1/1 from a worker" in console  # a worker's marked line, without Ray's prefix
    assert "[seedline]" not in console and "pid=" not in console
    for noise in (*NOISE, "worker noise", "Token authentication"):
        assert noise not in console, noise
    assert "\x1b[" not in console  # not a terminal: no colour codes
    assert res.stdout.strip() == str(tmp_path / "w" / "noisy")  # stdout: the run directory only
    stage_log = (logs / "noisy.log").read_text()
    for noise in NOISE:
        assert noise in stage_log, noise
    assert "\x1b[" not in stage_log
    for i in range(3):
        assert "(chatty pid=" in stage_log and f"worker noise {i}" in stage_log
    assert "(reporter pid=" in stage_log and "worker noise beside it" in stage_log
    assert "noisy: step 1/1 from a worker" in stage_log  # the marked line is in the log too
    driver = (logs / "driver.log").read_text()
    assert "noisy: running in" in driver and "noisy: succeeded" in driver


def test_verbose_shows_everything_on_the_console_too(tmp_path):
    res, logs = _run(tmp_path, "-v", ray=False)
    for noise in NOISE:
        assert noise in res.stderr, noise
        assert noise in (logs / "noisy.log").read_text()
    assert "noisy: doing the work" in res.stderr
    assert res.stderr.count("noisy: doing the work") == 1


def test_logs_of_an_object_store_run_are_uploaded_per_stage_and_go_on_when_resumed(tmp_path, monkeypatch):
    import io

    import boto3
    from moto.server import ThreadedMotoServer

    from pipeline import storage
    from pipeline.run_logs import Router

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="runs")
        run_dir = "s3://runs/w/demo"
        console = io.StringIO()
        router = Router(console, verbose=False)
        router.write("before the run directory is known\n")
        router.stage_started(run_dir, "tokenize")
        router.write("\x1b[36m(RayTrainWorker pid=7)\x1b[0m noise\n")
        router.say("tokenize: step 1/2\n")
        router.stage_ended(run_dir, "tokenize")
        assert storage.read_text(f"{run_dir}/logs/tokenize.log") == (
            "(RayTrainWorker pid=7) noise\ntokenize: step 1/2\n")
        router.close()
        assert storage.read_text(f"{run_dir}/logs/driver.log") == "before the run directory is known\n"
        assert console.getvalue() == "tokenize: step 1/2\n"  # not a terminal: no colour, no noise

        again = Router(io.StringIO(), verbose=False)  # a resumed run appends to the same logs
        again.stage_started(run_dir, "tokenize")
        again.write("second attempt\n")
        again.close()
        assert storage.read_text(f"{run_dir}/logs/tokenize.log").endswith("step 1/2\nsecond attempt\n")
    finally:
        server.stop()
