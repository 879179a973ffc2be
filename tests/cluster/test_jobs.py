"""Pipelines on a real Ray cluster (token auth on, 127.0.0.1): submit the data stages, follow and read
the logs, list and stop jobs, resume runs with finished stages skipped, on a local and an S3 workdir."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import boto3
import pytest
from cluster_helpers import pipeline_config, write_corpus
from moto.server import ThreadedMotoServer

from cluster.client import connect
from cluster.jobs import info, logs, wait
from cluster.submit import resubmit
from pipeline import storage

SECRET = f"sl-secret-{secrets.token_hex(8)}"  # an AWS secret key that must never show anywhere


def _job_id(out: str) -> str:
    return out.strip().splitlines()[-1]


def _status(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def local_run(ray_head, corpus, tmp_path_factory) -> dict:
    """`seedline submit` of the data stages with a local workdir, followed to the end."""
    base = tmp_path_factory.mktemp("local")
    cfg = pipeline_config(base / "demo.yaml", "demo", str(base / "runs"), corpus)
    env = dict(ray_head.env, AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY=SECRET)
    sub = ray_head.seedline("submit", str(cfg), "--address", ray_head.address, env=env)
    assert sub.returncode == 0, sub.stderr
    job = _job_id(sub.stdout)
    follow = ray_head.seedline("logs", job, "--follow", "--address", ray_head.address)
    return {"job": job, "submit": sub, "follow": follow, "run_dir": base / "runs" / "demo"}


def test_submitted_data_stages_succeed_and_their_logs_can_be_read(ray_head, local_run):
    follow = local_run["follow"]
    assert follow.returncode == 0, follow.stdout[-3000:] + follow.stderr
    assert "job status: SUCCEEDED" in follow.stderr
    assert "dedupe: succeeded" in follow.stdout and "tokenize: succeeded" in follow.stdout

    job, run_dir = local_run["job"], local_run["run_dir"]
    printed = ray_head.seedline("logs", job, "--address", ray_head.address)
    assert printed.returncode == 0
    assert "dedupe: running in dedupe-" in printed.stdout and str(local_run["run_dir"]) in printed.stdout

    [dedupe_dir] = (run_dir.parent / "store").glob("dedupe-*")
    [tokenize_dir] = (run_dir.parent / "store").glob("tokenize-*")
    assert _status(dedupe_dir / "status.json")["state"] == "succeeded"
    manifest = json.loads((tokenize_dir / "manifest.json").read_text())
    assert manifest["seq_len"] == 32 and manifest["splits"]["train"]["rows"] > 0

    # The job is recorded with the run, with its config, and listed by `seedline jobs`.
    [entry] = json.loads((run_dir / "jobs.json").read_text())
    assert entry["job_id"] == job and entry["address"] == ray_head.address
    assert entry["entrypoint"] == "python -m cluster.job_entry seedline run .seedline-job/demo.yaml"
    assert entry["submitted"] > 0
    listed = ray_head.seedline("jobs", "--address", ray_head.address)
    assert listed.returncode == 0
    [line] = [ln for ln in listed.stdout.splitlines() if ln.startswith(job)]
    assert "SUCCEEDED" in line and " demo " in line


def test_secrets_stay_out_of_metadata_logs_and_tracking(ray_head, local_run, monkeypatch):
    sub = local_run["submit"]
    assert "AWS_SECRET_ACCESS_KEY" in sub.stderr, "the user is told which variables were passed"
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    details = info(connect(ray_head.address), local_run["job"])
    assert details.metadata["seedline.pipeline"] == "demo"
    assert details.metadata["seedline.run_dir"] == str(local_run["run_dir"])
    visible = [sub.stdout, sub.stderr, local_run["follow"].stdout, local_run["follow"].stderr,
               json.dumps(details.metadata), details.entrypoint]
    for text in visible:
        assert SECRET not in text and ray_head.token not in text
    # Nothing in the run directory holds it either: configs, status, jobs.json, the MLflow store.
    for f in local_run["run_dir"].rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert SECRET.encode() not in data and ray_head.token.encode() not in data, f
    assert (local_run["run_dir"].parent / "mlflow.db").exists()
    assert SECRET.encode() not in (local_run["run_dir"].parent / "mlflow.db").read_bytes()


def test_resume_through_the_cluster_skips_finished_stages(ray_head, local_run, monkeypatch):
    run_dir = local_run["run_dir"]
    before = {p.parent.name: _status(p) for p in (run_dir.parent / "store").glob("*/status.json")}
    resumed = ray_head.seedline("resume", str(run_dir), "--address", ray_head.address)
    assert resumed.returncode == 0, resumed.stderr
    job = _job_id(resumed.stdout)
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    client = connect(ray_head.address)
    assert wait(client, job, timeout=180) == "SUCCEEDED", logs(client, job)
    out = logs(client, job)
    assert "dedupe: done" in out and "tokenize: done" in out and "skipped" in out
    after = {p.parent.name: _status(p) for p in (run_dir.parent / "store").glob("*/status.json")}
    assert after == before, "finished stages are not run again"
    jobs = json.loads((run_dir / "jobs.json").read_text())
    assert [j["job_id"] for j in jobs] == [local_run["job"], job]


def test_unknown_job_and_wrong_token_are_one_line_errors(ray_head):
    missing = ray_head.seedline("logs", "no-such-job", "--address", ray_head.address)
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr
    wrong = ray_head.seedline("jobs", "--address", ray_head.address,
                              env=dict(ray_head.env, RAY_AUTH_TOKEN="not-the-token"))
    assert wrong.returncode == 2 and "refused the request" in wrong.stderr
    assert "Traceback" not in missing.stderr + wrong.stderr


@pytest.fixture
def s3(monkeypatch) -> dict[str, str]:
    """A real S3-compatible server (moto) on 127.0.0.1, with a bucket; its settings in this process's
    environment (for resubmit and reading results) and returned for the CLI's."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"]).create_bucket(Bucket="seedline")
    yield env
    server.stop()


def _wait_for_state(s3_env: dict[str, str], prefix: str, stage: str, timeout: float = 120) -> None:
    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL_S3"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = client.list_objects_v2(Bucket="seedline", Prefix=prefix).get("Contents", [])
        keys = [o["Key"] for o in listing]
        for key in keys:
            if key.endswith("/status.json") and key.split("/")[-2].startswith(f"{stage}-"):
                body = client.get_object(Bucket="seedline", Key=key)["Body"].read()
                if json.loads(body)["state"] == "running":
                    return
        time.sleep(0.2)
    raise AssertionError(f"{stage} never started under s3://seedline/{prefix}")


def test_stopped_run_on_s3_resumes_to_identical_outputs(ray_head, local_run, corpus, s3, tmp_path,
                                                         monkeypatch):
    """The same pipeline with an S3 workdir: stopped mid-dedupe, resumed through the cluster, it ends
    with the same bytes as the uninterrupted local run."""
    cfg = pipeline_config(tmp_path / "demo.yaml", "demo", str(tmp_path / "unused"), corpus, tracking=False)
    env = dict(ray_head.env, **s3)
    sub = ray_head.seedline("submit", str(cfg), "--address", ray_head.address,
                            "--workdir", "s3://seedline/runs", env=env)
    assert sub.returncode == 0, sub.stderr
    job = _job_id(sub.stdout)
    _wait_for_state(s3, "runs/store/", "dedupe")  # stage outputs live in the workdir's shared store
    stopped = ray_head.seedline("stop", job, "--address", ray_head.address)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"{job}: STOPPED", stopped.stderr

    run_dir = "s3://seedline/runs/demo"
    assert [j["job_id"] for j in storage.read_json(f"{run_dir}/jobs.json")] == [job]
    store = "s3://seedline/runs/store"
    statuses = {p: storage.read_json(p)["state"] for p in storage.glob(f"{store}/*/status.json")}
    assert "succeeded" not in {s for p, s in statuses.items() if "/tokenize-" in p}

    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    monkeypatch.setenv("HOME", ray_head.env["HOME"])
    monkeypatch.setenv("SEEDLINE_LEASE_TTL", "3")  # the stopped driver's lease goes stale quickly
    again = resubmit(run_dir, ray_head.address)
    client = connect(ray_head.address)
    assert wait(client, again, timeout=180) == "SUCCEEDED", logs(client, again)
    assert "dedupe: resuming" in logs(client, again)

    local = local_run["run_dir"].parent / "store"
    storage.fs_for(run_dir)[0].invalidate_cache()  # the job wrote there since this process listed it
    assert sorted(storage.listdir(store)) == sorted(p.name for p in local.iterdir()), "same stage dirs"
    compared = 0
    for f in sorted(local.rglob("*")):
        rel = f.relative_to(local).as_posix()
        outputs = f.suffix in (".parquet", ".arrow") or f.name in ("manifest.json", "tokenizer.json")
        if outputs and "/work/" not in rel:  # work/ holds markers with timings
            assert storage.read_bytes(f"{store}/{rel}") == f.read_bytes(), rel
            compared += 1
    assert compared >= 6
