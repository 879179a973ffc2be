"""Submission before the cluster is contacted: config errors, the environment handed to the job."""

from __future__ import annotations

import pytest
import yaml

from cluster.errors import ClusterError
from cluster.submit import job_env, submit
from pipeline.errors import ConfigError


def test_job_env_passes_only_what_stages_need(monkeypatch):
    for k in ("AWS_SECRET_ACCESS_KEY", "SEEDLINE_LEASE_TTL", "GITHUB_TOKEN", "RAY_AUTH_TOKEN", "MY_VAR"):
        monkeypatch.setenv(k, f"value-of-{k}")
    env = job_env()
    assert env["AWS_SECRET_ACCESS_KEY"] == "value-of-AWS_SECRET_ACCESS_KEY"
    assert env["SEEDLINE_LEASE_TTL"] == "value-of-SEEDLINE_LEASE_TTL"
    assert "GITHUB_TOKEN" not in env and "RAY_AUTH_TOKEN" not in env and "MY_VAR" not in env
    # Seedline's own ray.init inside the job may add env vars the job also sets; Ray must merge them.
    assert env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    assert job_env(["MY_VAR"])["MY_VAR"] == "value-of-MY_VAR"
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN: Ray's settings come from the cluster"):
        job_env(["RAY_AUTH_TOKEN"])
    with pytest.raises(ClusterError, match="NOT_SET_ANYWHERE: not set"):
        job_env(["NOT_SET_ANYWHERE"])


def test_config_errors_are_reported_before_the_cluster_is_contacted(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t")
    monkeypatch.chdir(tmp_path)  # the input glob below is relative; submit pre-flights it (loopback cluster)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.jsonl").write_text('{"text": "a"}\n')
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"name": "p", "workdir": str(tmp_path / "runs"),
                                   "stages": {"dedupe": {"input": "x/*.jsonl", "threshold": 2}}}))
    address = "http://127.0.0.1:9"  # nothing listens there: reaching it would be a different error
    with pytest.raises(ConfigError, match=r"stages\.dedupe\.threshold"):
        submit(cfg, address)
    with pytest.raises(ConfigError, match="unknown key"):
        submit(cfg, address, ["stages.dedupe.nope=1", "stages.dedupe.threshold=0.8"])
    with pytest.raises(ConfigError, match="tracking.uri: required when workdir is a URL"):
        submit(cfg, address, ["stages.dedupe.threshold=0.8"], workdir="s3://bucket/runs")
    with pytest.raises(ConfigError, match="config file not found"):
        submit(tmp_path / "missing.yaml", address)
    assert not (tmp_path / "runs").exists()
    # A valid config gets as far as the cluster, which is not there: one clear line.
    with pytest.raises(ClusterError, match="cannot reach the Ray job API at http://127.0.0.1:9"):
        submit(cfg, address, ["stages.dedupe.threshold=0.8"])
    assert not (tmp_path / "runs").exists(), "a failed submission leaves nothing in the run"
