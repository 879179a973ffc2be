"""Connecting to Ray: an existing cluster, the cluster a Ray job runs in, or a local one on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import sys
import threading

# Ray replaces a loopback ``_node_ip_address`` with the machine's external address unless "clusters" are
# off (its macOS/Windows mode): then every process of the node (GCS, raylet, object manager, workers,
# dashboard agent, runtime-env agent) binds to 127.0.0.1. Read by Ray at import time and by every process
# it starts, so it is set in the environment before Ray starts.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"


def _loopback_only() -> None:
    """Make the Ray node started by this process listen on loopback only."""
    os.environ[LOCAL_ONLY_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # Ray was imported before the variable was set (a stage imports it early)
        constants.ENABLE_RAY_CLUSTER = False


START_ATTEMPTS = 3
_INIT_LOCK = threading.Lock()  # sweep variants run in threads of one driver: one ray.init


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process (thread-safe); see ``_init_ray``."""
    from pipeline import run_logs

    with _INIT_LOCK:
        _init_ray(address, num_cpus)
        run_logs.attach_ray()  # when the CLI captures output: worker lines to the stage logs


def _init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process.

    ``address=None`` attaches to the cluster when running inside a Ray job (``RAY_ADDRESS`` is set
    there), else starts a local Ray whose every listening socket is on 127.0.0.1 (tested in
    ``tests/pipeline/test_hardening_ray.py``), so nothing is reachable from other machines.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        _loopback_only()
    import ray

    if ray.is_initialized():
        return
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "")}
    runtime_env = {"env_vars": {k: v for k, v in env.items() if v}}
    if address:
        # Inside a Ray job the job's runtime env already carries the variables; passing ours would clash.
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(address=address, runtime_env=None if in_job else runtime_env, log_to_driver=True)
        return
    logging.getLogger("seedline").info("starting Ray (local, 127.0.0.1)")
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(
                num_cpus=num_cpus,
                # The dashboard (on loopback only) serves the State API that Ray Train V2's placement-group
                # cleaner polls; without it the cleaner fails every poll and floods the log.
                include_dashboard=True,
                dashboard_host=LOOPBACK,
                _node_ip_address=LOOPBACK,
                runtime_env=runtime_env,
                log_to_driver=True,
                configure_logging=False,
            )
            return
        except Exception as e:
            # Ray gives a new node a fixed time to register; a busy machine can miss it. Start afresh.
            if "timed out during startup" not in str(e) or attempt == START_ATTEMPTS:
                raise
            logging.getLogger("seedline").warning("Ray start timed out (attempt %d of %d); retrying",
                                                  attempt, START_ATTEMPTS)
            ray.shutdown()
