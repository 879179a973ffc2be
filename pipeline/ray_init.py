"""Connecting to Ray: an existing cluster, the cluster a Ray job runs in, or a local one on 127.0.0.1."""

from __future__ import annotations

import os


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process.

    ``address=None`` attaches to the cluster when running inside a Ray job (``RAY_ADDRESS`` is set
    there), else starts a local Ray bound to 127.0.0.1 only, so nothing listens on other interfaces.
    """
    import ray

    if ray.is_initialized():
        return
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "")}
    runtime_env = {"env_vars": {k: v for k, v in env.items() if v}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside a Ray job the job's runtime env already carries the variables; passing ours would clash.
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(address=address, runtime_env=None if in_job else runtime_env, log_to_driver=True)
        return
    ray.init(
        num_cpus=num_cpus,
        # The dashboard (on loopback only) serves the State API that Ray Train V2's placement-group cleaner
        # polls; without it the cleaner fails every poll and floods the log.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
        configure_logging=False,
    )
