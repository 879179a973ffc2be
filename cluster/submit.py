"""Submit a pipeline run to a Ray cluster as a job, and resubmit (resume) a run.

The job runs ``seedline run .seedline-job/<name>.yaml`` (through ``cluster.job_entry``, which gives the
driver a private copy of the working directory) in a working directory holding the project's
source and the effective config (overrides applied, ``workdir`` made absolute, ``ray.address`` cleared
so the stages attach to the job's own cluster). Every job is recorded with its run in
``<run_dir>/jobs.json``, and its config in ``<run_dir>/jobs/<job_id>.yaml``, which is what ``resume``
submits again: the runner then skips the stages that already succeeded.

Secrets stay out of everything visible: metadata holds names and paths only, the entrypoint holds no
values, and environment variables go to the job through ``runtime_env.env_vars`` for the names the
stages need, never printed.
"""

from __future__ import annotations

import copy
import getpass
import os
import secrets
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster import auth, package
from cluster.client import connect, translate_errors
from cluster.errors import ClusterError
from pipeline import storage
from pipeline.config import PipelineConfig, apply_override, read_yaml, validate_config
from pipeline.errors import ConfigError

# Environment variables the stages may need, passed to the job when set here (values never shown).
PASS_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_S3_ENDPOINT_URL",
    "DS_ACCELERATOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
)
PASS_PREFIX = "SEEDLINE_"
JOBS_FILE = "jobs.json"


@dataclass
class Submission:
    """A submitted job and what the user should be told about it."""

    job_id: str
    address: str
    run_dir: str
    entrypoint: str
    env_names: list[str]
    warnings: list[str] = field(default_factory=list)


def job_env(extra: Iterable[str] = ()) -> dict[str, str]:
    """The variables to hand to the job: the known names and ``SEEDLINE_*`` that are set, plus
    ``extra`` names (which must be set). Ray's own settings (``RAY_*``, the token) never travel: the
    cluster has its own."""
    env = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}
    env.update({k: v for k, v in os.environ.items() if k.startswith(PASS_PREFIX)})
    for name in extra:
        if name.startswith("RAY_"):
            raise ClusterError(f"--env {name}: Ray's settings come from the cluster, not the job",
                               exit_code=2)
        if name not in os.environ:
            raise ClusterError(f"--env {name}: not set in this environment", exit_code=2)
        env[name] = os.environ[name]
    # Seedline's init_ray passes its own runtime_env inside the job; let it merge with the job's.
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    return env


def _redact_url(text: str) -> str:
    from pipeline.tracking import redact

    return redact("path", text)


def _git_sha(root: Path | None) -> str | None:
    if root is None:
        return None
    from pipeline.runner import git_sha

    return git_sha()


def new_job_id(name: str) -> str:
    return f"seedline-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _effective(data: dict[str, Any], address: str) -> tuple[dict[str, Any], PipelineConfig]:
    """Validate and pre-flight, then pin what must not differ on the cluster: the absolute workdir, and no
    Ray address (the job's stages attach to the cluster the job runs in)."""
    from pipeline.preflight import check

    cfg = validate_config(copy.deepcopy(data))
    if cfg.tracking.enabled:
        cfg.tracking_uri()  # a URL workdir needs a tracking server: say so now, not inside the job
    # Local input paths are checked only for a cluster on this machine: another one may see other files.
    check(cfg, local_paths=auth.is_loopback(address))
    out = copy.deepcopy(data)
    out["workdir"] = cfg.workdir
    ray_section = dict(out.get("ray") or {})
    ray_section["address"] = None
    out["ray"] = ray_section
    return out, cfg


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def submit(config_path: str | Path, address: str, overrides: Iterable[str] = (), *,
           workdir: str | None = None, insecure: bool = False, env: Iterable[str] = (),
           warn: Callable[[str], None] = _warn) -> Submission:
    """Submit ``seedline run CONFIG`` as a Ray job; see the module docstring. Warnings go to ``warn`` as
    soon as they are known (before the cluster is contacted)."""
    address = auth.normalize_address(address)
    token = auth.find_token()
    warnings = auth.check_submission(address, token, insecure)  # before any connection
    for w in warnings:
        warn(w)
    data = read_yaml(config_path)
    overrides = list(overrides)
    for o in overrides:
        apply_override(data, o)
    if workdir:
        data["workdir"] = workdir
    data, cfg = _effective(data, address)
    keys = [o.partition("=")[0].strip() for o in overrides] + (["workdir"] if workdir else [])
    return _submit(address, token, cfg, data, kind="run", override_keys=keys, env=env, warnings=warnings,
                   warn=warn)


def resubmit(run_dir: str, address: str, insecure: bool = False) -> str:
    """Submit the run at ``run_dir`` again (same config, same workdir); the runner skips the stages that
    already succeeded. The config is the one of the run's last job, or the run's ``run.json`` for a
    run started with ``seedline run``. Returns the new job id."""
    address = auth.normalize_address(address)
    token = auth.find_token()
    warnings = auth.check_submission(address, token, insecure)
    for w in warnings:
        _warn(w)
    run_dir = storage.resolve(run_dir)
    data = _config_of_run(run_dir)
    parent, _, name = run_dir.rpartition("/")
    if data.get("name") != name:
        raise ConfigError("RUN_DIR", f"{run_dir} holds pipeline '{data.get('name')}', not '{name}'")
    data["workdir"] = parent or "/"
    data, cfg = _effective(data, address)
    sub = _submit(address, token, cfg, data, kind="resume", override_keys=[], env=(), warnings=warnings,
                  warn=_warn)
    return sub.job_id


def _config_of_run(run_dir: str) -> dict[str, Any]:
    for entry in reversed(recorded_jobs(run_dir)):
        path = entry.get("config")
        if path and storage.exists(path):
            return yaml.safe_load(storage.read_text(path))
    from pipeline.preflight import read_run_json, resumable_config

    run = read_run_json(run_dir)  # a corrupt run.json is a one-line error naming it
    if run and run.get("config"):
        return copy.deepcopy(resumable_config(run_dir))
    raise ConfigError("RUN_DIR", f"no Seedline run at {run_dir} (neither {JOBS_FILE} nor run.json)")


def _submit(address: str, token: auth.Token | None, cfg: PipelineConfig, data: dict[str, Any], *,
            kind: str, override_keys: list[str], env: Iterable[str], warnings: list[str],
            warn: Callable[[str], None]) -> Submission:
    run_dir = cfg.run_dir()
    local_workdir = storage.local(cfg.workdir)
    if local_workdir is not None and not auth.is_loopback(address):
        warnings.append(f"workdir {cfg.workdir} is a local path: the cluster's nodes must see it at the same "
                        "path (a shared filesystem); use an s3:// workdir otherwise")
        warn(warnings[-1])
    env_vars = job_env(env)
    root = package.project_root()
    job_id = new_job_id(cfg.name)
    config_rel = f"{package.JOB_DIR}/{cfg.name}.yaml"
    config_text = yaml.safe_dump(data, sort_keys=False)
    # The driver runs from its own copy of the working directory (see cluster/job_entry.py for why).
    entrypoint = f"python -m cluster.job_entry seedline run {shlex.quote(config_rel)}"
    sha = _git_sha(root)
    if sha:
        env_vars["SEEDLINE_GIT_SHA"] = sha
    metadata = {
        "seedline.pipeline": cfg.name, "seedline.run_dir": _redact_url(run_dir), "seedline.kind": kind,
        "seedline.overrides": ",".join(override_keys), "seedline.git_sha": sha or "unknown",
        "seedline.submitted_by": f"{getpass.getuser()}@{socket.gethostname()}",
    }
    client = connect(address, token)  # reachable, and the token accepted, before anything is written
    config_copy = storage.join(run_dir, "jobs", f"{job_id}.yaml")
    try:  # also proves, before submitting, that this machine can write to the run's storage
        storage.write_text(config_copy, config_text)
    except OSError as e:
        raise ClusterError(f"cannot write to the run directory {run_dir}: {e}", exit_code=2) from None
    skip = []
    if root is not None and local_workdir is not None and local_workdir.resolve().is_relative_to(root):
        skip.append(local_workdir.resolve().relative_to(root))
    with tempfile.TemporaryDirectory(prefix="seedline-job-") as tmp:
        wd = package.build_working_dir(Path(tmp) / "wd", root, {config_rel: config_text}, skip)
        with translate_errors(address):
            _submit_when_ready(client, entrypoint=entrypoint, submission_id=job_id, metadata=metadata,
                               runtime_env={"working_dir": str(wd), "env_vars": env_vars})
    record_job(run_dir, {"job_id": job_id, "address": _redact_url(address), "submitted": time.time(),
                         "entrypoint": entrypoint, "config": config_copy, "kind": kind})
    names = sorted(k for k in env_vars if k != "RAY_OVERRIDE_JOB_RUNTIME_ENV")
    return Submission(job_id, address, run_dir, entrypoint, names, warnings)


AGENT_WAIT_S = 90.0


def _submit_when_ready(client, **job) -> None:
    """Submit, waiting while the head's job agent is not up yet (a cluster that just started answers
    "No available agent to submit job, please try again later"); any other error is raised at once."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(**job)
            return
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def _forget_listings(run_dir: str) -> None:
    """Drop fsspec's cached listings under ``run_dir``: jobs on the cluster write there, and a stale
    listing makes s3fs report new files missing and overwritten ones expired."""
    if storage.is_url(run_dir):
        fs, inner = storage.fs_for(run_dir)
        fs.invalidate_cache(inner)


def recorded_jobs(run_dir: str) -> list[dict[str, Any]]:
    """The jobs submitted for this run, oldest first."""
    _forget_listings(run_dir)
    return storage.read_json_or(storage.join(run_dir, JOBS_FILE), [])


def record_job(run_dir: str, entry: dict[str, Any]) -> None:
    jobs = recorded_jobs(run_dir)
    jobs.append(entry)
    storage.write_json(storage.join(run_dir, JOBS_FILE), jobs)


def submit_and_report(config_path: str | Path, address: str, overrides: Iterable[str], workdir: str | None,
                      insecure: bool, env: Iterable[str], say: Callable[[str], None]) -> Submission:
    """``submit`` plus the lines the CLI shows (warnings first, values of variables never)."""
    sub = submit(config_path, address, overrides, workdir=workdir, insecure=insecure, env=env,
                 warn=lambda w: say(f"warning: {w}"))
    say(f"submitted job {sub.job_id} to {sub.address}")
    say(f"  run dir:    {sub.run_dir}")
    say(f"  entrypoint: {sub.entrypoint}")
    if sub.env_names:
        say(f"  env passed: {', '.join(sub.env_names)} (values not shown)")
    say(f"  follow:     seedline logs {sub.job_id} --follow --address {sub.address}")
    return sub
