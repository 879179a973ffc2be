"""``seedline submit | jobs | logs | stop``: the cluster commands, added to the main CLI by ``register``.

Errors are one line on stderr: exit 2 for what the user must fix (config, address, token, unknown job),
1 for cluster failures. Job output goes to stdout; everything else to stderr, so
``JOB=$(seedline submit ...)`` captures the job id.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer

from pipeline.errors import ConfigError, SeedlineError

AddressOpt = Annotated[str | None, typer.Option(
    "--address", "-a", help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")]


def _say(line: str) -> None:
    typer.echo(line, err=True)


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Seedline errors become one line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from cluster.errors import ClusterError

        try:
            return fn(*args, **kwargs)
        except ClusterError as e:
            _say(f"error: {e}")
            raise typer.Exit(e.exit_code) from None
        except ConfigError as e:
            _say(f"error: {e}")
            raise typer.Exit(2) from None
        except SeedlineError as e:
            _say(f"error: {e}")
            raise typer.Exit(1) from None

    return wrapper


def _client(address: str | None) -> Any:
    from cluster.client import connect, default_address

    return connect(default_address(address))


def _exit_for(status: str) -> None:
    _say(f"job status: {status}")
    if status != "SUCCEEDED":
        raise typer.Exit(1)


@_errors
def submit_cmd(
    config: Annotated[str, typer.Argument(help="pipeline config YAML")],
    address: AddressOpt = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="override a config value: key.path=value (repeatable)")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="allow a non-loopback cluster without a Ray auth token (anyone on its network "
                           "can run code there)")] = False,
    workdir: Annotated[str | None, typer.Option(
        "--workdir", help="workdir on storage the cluster shares, e.g. s3://bucket/runs")] = None,
    env: Annotated[list[str] | None, typer.Option(
        "--env", help="also pass this environment variable to the job (repeatable; never shown)")] = None,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="stream the job's output until it ends")] = False,
) -> None:
    """Submit the pipeline as a Ray job (`seedline run` on the cluster)."""
    from cluster.client import default_address
    from cluster.submit import submit_and_report

    sub = submit_and_report(config, default_address(address), overrides or [], workdir, insecure, env or [],
                            _say)
    typer.echo(sub.job_id)
    if follow:
        _follow(_client(sub.address), sub.job_id)


@_errors
def jobs_cmd(address: AddressOpt = None) -> None:
    """List the cluster's jobs."""
    from cluster.jobs import list_jobs

    rows = list_jobs(_client(address))
    if not rows:
        _say("no jobs")
        return
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started)) if r.started else "-"
        took = f"{(r.ended or time.time()) - r.started:.0f}s" if r.started else "-"
        typer.echo(f"{r.job_id}  {r.status:<9}  {started}  {took:>6}  {r.pipeline or '-'}  {r.entrypoint}")


def _follow(client: Any, job_id: str) -> None:
    from cluster.jobs import follow

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    _exit_for(follow(client, job_id, write))


@_errors
def logs_cmd(
    job: Annotated[str, typer.Argument(help="job id (see `seedline jobs`)")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep streaming until the job ends")] = False,
    address: AddressOpt = None,
) -> None:
    """Print a job's output (driver logs, including every stage's)."""
    from cluster.jobs import logs

    client = _client(address)
    if follow:
        _follow(client, job)
        return
    sys.stdout.write(logs(client, job))
    sys.stdout.flush()


@_errors
def stop_cmd(
    job: Annotated[str, typer.Argument(help="job id (see `seedline jobs`)")],
    address: AddressOpt = None,
) -> None:
    """Stop a job. Finished stages and shard markers stay; `seedline resume RUN_DIR` carries on."""
    from cluster.jobs import stop

    final = stop(_client(address), job)
    typer.echo(f"{job}: {final}")


def register(app: typer.Typer) -> None:
    """Add the cluster commands to the Seedline CLI (entry point ``seedline.commands``) and the hook that
    makes ``seedline resume --address`` a cluster job."""
    from cluster.submit import resubmit
    from pipeline.cli import HOOKS

    HOOKS["resubmit"] = resubmit
    app.command("submit")(submit_cmd)
    app.command("jobs")(jobs_cmd)
    app.command("logs")(logs_cmd)
    app.command("stop")(stop_cmd)
