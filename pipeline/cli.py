"""The ``seedline`` command line: run, resume, status, plan, ui (plus the cluster commands)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline import storage
from pipeline.errors import ConfigError, SeedlineError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
Overrides = Annotated[list[str], typer.Option("--set", "-s", help="override a key: stages.x.y=value")]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"seedline {version('seedline')}")
        except PackageNotFoundError:  # a bare checkout without installed metadata
            typer.echo("seedline (not installed)")
        raise typer.Exit()


@app.callback()
def _root(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                            help="print the version and exit")) -> None:
    """Seedline: an LLM pretraining pipeline (dedupe, filter, tokenize, pretrain, sft, dpo, evaluate) on
    Ray, tracked in MLflow. `seedline run configs/tiny.yaml` runs the demo."""


def _fail(e: Exception) -> None:
    """One line on stderr (no credentials) and the exit code: 2 for what the user must fix."""
    from pipeline.preflight import one_line
    from pipeline.redact import redact_text

    typer.echo(f"error: {one_line(redact_text(str(e)))}", err=True)
    code = getattr(e, "exit_code", None)  # cluster errors carry their own (2: refused, 1: cluster failed)
    raise typer.Exit(code if isinstance(code, int) else 2 if isinstance(e, ConfigError) else 1)


def _progress_bars(console):
    """A rich progress display on ``console`` and a factory of per-stage callbacks (``done``/``step`` of
    ``total``)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars = Progress(TextColumn("{task.description:24s}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), transient=False,
                    console=Console(file=console))

    def factory(stage: str):
        task = bars.add_task(stage, total=None, unit="")

        def update(state: dict) -> None:
            # Data stages report a sub-step name plus done/total; training reports an integer step.
            step, done = state.get("step"), state.get("done")
            if done is None and isinstance(step, int):
                done = step
            label = f"{stage} {step}" if isinstance(step, str) else stage
            bars.update(task, description=label, unit=state.get("unit", ""))
            if done is not None:
                bars.update(task, completed=done, total=state.get("total"))
        return update
    return bars, factory


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="also show Ray, DeepSpeed, torch, MLflow and "
                                       "worker output on the console (it always goes to <run>/logs/)")]


def _say(message: str) -> None:
    """A line for the user: on the console and in the run's driver log."""
    import logging

    logging.getLogger("seedline").info(message)


def _run(cfg, only: str | None, from_stage: str | None, verbose: bool = False) -> None:
    from pipeline import run_logs
    from pipeline.runner import run_pipeline
    from pipeline.summary import print_summary

    failed: SeedlineError | None = None
    with run_logs.capture(verbose) as router:
        tty = router.console.isatty()
        bars, factory = _progress_bars(router.console) if tty else (contextlib.nullcontext(), None)
        try:
            with bars:
                res = run_pipeline(cfg, only=only, from_stage=from_stage, show=_say, progress_factory=factory)
            print_summary(res.run_dir, res.outcomes, _say)
        except SeedlineError as e:
            failed = e
    if failed is not None:
        _fail(failed)
    typer.echo(res.run_dir)


@app.command()
def run(config: Path, overrides: Overrides = None, only: str | None = typer.Option(None, "--only"),
        from_stage: str | None = typer.Option(None, "--from"),
        sweep: list[str] = typer.Option(None, "--sweep", help="KEY=V1,V2: run one variant per value "
                                        "(repeat for a cross product); adds to the file's sweep: section"),
        max_parallel: int | None = typer.Option(None, "--max-parallel", min=1,
                                                help="sweep variants at once (default: max_parallel_stages, "
                                                     "else one per local CPU)"),
        verbose: Verbose = False) -> None:
    """Run (or continue) the pipeline described by CONFIG (every variant of its sweep, if it has one)."""
    from pipeline.config import load_raw, validate_config
    from pipeline.preflight import check
    from pipeline.sweep import expand, parse_cli, sweep_of

    try:
        data = load_raw(config, overrides or [])
        swept = sweep_of(data, parse_cli(sweep or []))
        if swept:
            variants = expand(data, swept)
            for v in variants:
                check(v.config)
        else:
            cfg = validate_config(data)
            check(cfg)  # inputs, model directories, workdir: before anything starts
    except SeedlineError as e:
        _fail(e)
    if swept:
        _run_sweep(data, swept, variants, max_parallel, verbose)
    else:
        _run(cfg, only, from_stage, verbose)


def _run_sweep(data: dict, swept: dict, variants: list, max_parallel: int | None, verbose: bool) -> None:
    from pipeline import run_logs
    from pipeline.sweep import default_parallel, run_sweep, write_index

    base = variants[0].config
    sweep_dir = storage.join(base.workdir, data.get("name", "run"))
    write_index(sweep_dir, swept, variants)
    parallel = max_parallel or base.max_parallel_stages or default_parallel(variants)
    typer.echo(f"sweep {sweep_dir}: {len(variants)} variants, {parallel} at once", err=True)
    with run_logs.capture(verbose):
        results = run_sweep(variants, data.get("name", "run"), parallel, _say)
    failed = {n: r for n, r in results.items() if isinstance(r, Exception)}
    for name, err in failed.items():
        typer.echo(f"error: variant {name}: {err}", err=True)
    for r in results.values():
        if not isinstance(r, Exception):
            typer.echo(r.run_dir)
    typer.echo(sweep_dir)
    if failed:
        raise typer.Exit(1)


@app.command()
def resume(run_dir: str, address: str | None = typer.Option(None, "--address"),
           insecure: bool = typer.Option(False, "--insecure"), verbose: Verbose = False) -> None:
    """Resume a run from its saved run.json (locally, or on a cluster with --address)."""
    from pipeline.config import validate_config

    try:
        if address:
            if "resubmit" not in HOOKS:
                raise ConfigError("--address", "cluster support is not installed (the cluster package)")
            typer.echo(HOOKS["resubmit"](run_dir, address, insecure=insecure))
            return
        from pipeline.preflight import check, resumable_config

        cfg = validate_config(resumable_config(run_dir))
        check(cfg)
    except SeedlineError as e:
        _fail(e)
    _run(cfg, None, None, verbose)


def _newest_run(workdir: str) -> str:
    runs = sorted(Path(workdir).glob("*/run.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise ConfigError("RUN_DIR", f"no run found under ./{workdir}; pass the run directory")
    return str(runs[-1].parent)


def _rows(run_dir: str) -> list[dict]:
    """One row per stage instance, in pipeline order, with its live health (``pipeline.health``)."""
    from pipeline.health import classify
    from pipeline.preflight import read_run_json
    from pipeline.state import lease_alive, read_lease, read_progress, read_status, recorded_stage_dirs

    data = read_run_json(run_dir)  # a corrupt one is a one-line error naming the file
    if data is None:
        raise ConfigError("RUN_DIR", f"no run.json in {run_dir}")
    rows, now = [], time.time()
    for name, sdir in recorded_stage_dirs(run_dir, data).items():
        dirname = sdir.rsplit("/", 1)[-1]
        st = read_status(sdir)
        state = st["state"]
        if state == "running" and not lease_alive(read_lease(sdir)):
            state = "interrupted"
        progress = read_progress(sdir) or st.get("progress", {})
        start, end = st.get("started"), st.get("finished") or now
        updated = progress.get("updated")
        rows.append({"stage": name, "state": classify(state, progress, now),
                     "fingerprint": dirname.rsplit("-", 1)[1], "progress": progress,
                     "elapsed_s": round(end - start, 1) if start else None,
                     "updated_ago_s": round(now - updated, 1) if updated and state == "running" else None,
                     "loss": progress.get("loss"), "tokens_per_s": progress.get("tokens_per_s"),
                     "mlflow_run_id": st.get("mlflow_run_id"), "error": st.get("error"),
                     "made_by": st.get("run_dir")})
    return rows


STATE_STYLE = {"succeeded": "green", "failed": "bold red", "running": "cyan", "stalled": "bold yellow",
               "diverging": "bold magenta", "interrupted": "yellow", "pending": "dim"}


def _status_table(run_dir: str, rows: list[dict]):
    from rich.table import Table

    t = Table("stage", "state", "progress", "loss", "tokens/s", "updated", "elapsed", "error",
              title=f"run {run_dir.rstrip('/').rsplit('/', 1)[-1]}  ({run_dir})", title_justify="left")
    for r in rows:
        state = r["state"]
        label = state.upper() if state in ("stalled", "diverging") else state
        t.add_row(r["stage"], f"[{STATE_STYLE.get(state, '')}]{label}[/]",
                  _describe_progress(r["progress"] or {}),
                  f"{r['loss']:.4g}" if isinstance(r["loss"], int | float) else "",
                  f"{r['tokens_per_s']:,}" if r["tokens_per_s"] else "",
                  f"{r['updated_ago_s']:.0f}s ago" if r["updated_ago_s"] is not None else "",
                  f"{r['elapsed_s']}s" if r["elapsed_s"] else "", (r["error"] or "")[:80])
    return t


@app.command()
def status(run_dir: str | None = typer.Argument(None, help="default: the newest run under ./runs"),
           as_json: bool = typer.Option(False, "--json", help="the same rows as JSON"),
           watch: bool = typer.Option(False, "--watch", "-w",
                                      help="refresh in place every 2 s (Ctrl-C stops)")) -> None:
    """Each stage in pipeline order: state (STALLED, DIVERGING beyond running), progress, loss, tokens/s,
    when it last reported, elapsed time and the error of a failed stage."""
    try:
        run_dir = run_dir or _newest_run("runs")
        rows = _rows(run_dir)
    except SeedlineError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console

    if not watch:
        Console().print(_status_table(run_dir, rows))
        return
    from rich.live import Live

    with Live(_status_table(run_dir, rows), refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(2)
                live.update(_status_table(run_dir, _rows(run_dir)))
        except KeyboardInterrupt:
            pass


def _result_fields(node, recorded: dict) -> dict:
    """A recorded stage config without its volatile fields (as recorded, if the schema moved on since)."""
    from pydantic import ValidationError

    from pipeline.fingerprint import result_fields

    try:
        return result_fields(node.spec.config_model(**recorded))
    except ValidationError:
        return recorded


def _describe_progress(p: dict) -> str:
    """``3/4 shards (encode)`` for data stages, ``step 120/300, 1.2M tokens, ETA 40s`` for training."""
    step = p.get("step")
    if isinstance(step, int):
        text = f"step {step}/{p.get('total', '?')}"
        if p.get("tokens"):
            text += f", {p['tokens'] / 1e6:.1f}M tokens"
        if p.get("eta_s") is not None:
            text += f", ETA {int(p['eta_s'])}s"
        return text
    text = f"{p['done']}/{p.get('total', '?')} {p.get('unit', '')}".strip() if "done" in p else ""
    return f"{text} ({step})" if step else text


def _explain(n, state, old_entry: str | None) -> str:
    """One plan line: reuse (from which run), skip, resume, or run (and which keys changed)."""
    from pipeline.fingerprint import result_fields
    from pipeline.state import entry_dir, read_status
    from pipeline.tracking import flatten

    st = read_status(state.stage_dir(n.dirname))
    made_by = st.get("run_dir")
    if st["state"] == "succeeded":
        other = made_by and made_by != state.run_dir
        action, why = ("reuse", f"made by run {made_by}") if other else ("skip", "")
    elif st["state"] == "pending":
        action, why = "run", "new config"
    else:
        action, why = "resume", f"{st['state']} in run {made_by or state.run_dir}"
    if action == "run" and old_entry and old_entry.rsplit("/", 1)[-1] != n.dirname:
        old_dir = entry_dir(state.run_dir, old_entry)
        old_config = storage.read_json_or(storage.join(old_dir, "config.json"), {})
        prev = flatten(_result_fields(n, old_config))
        cur = flatten(result_fields(n.config))
        changed = sorted(k for k in set(prev) | set(cur) if prev.get(k) != cur.get(k))
        why = ("changed: " + ", ".join(f"stages.{n.name}.{k}" for k in changed) if changed
               else "an upstream stage changed")
        why += f" (was {old_entry.rsplit('/', 1)[-1]})"
    return f"{n.name:10s} {action:7s} {n.dirname}" + (f"  {why}" if why else "")


@app.command()
def plan(config: Path, overrides: Overrides = None,
         show_config: bool = typer.Option(False, "--show-config", "-c",
                                          help="also print each stage's resolved config (defaults merged) "
                                               "as YAML, as run.json will record it")) -> None:
    """What would run or be skipped, and which config keys changed for a stage that would re-run."""
    from pipeline.config import load_config
    from pipeline.graph import order
    from pipeline.preflight import check

    try:
        cfg = load_config(config, overrides or [])
        nodes = order(cfg)
        check(cfg)
    except SeedlineError as e:
        _fail(e)
    from pipeline.state import RunState

    state = RunState(cfg.run_dir())
    recorded = state.load().get("stages", {})
    for n in nodes:
        typer.echo(_explain(n, state, recorded.get(n.name)))
    if show_config:
        import yaml

        from pipeline.config import resolved

        typer.echo(yaml.safe_dump({"stages": resolved(cfg)["stages"]}, sort_keys=False).rstrip())


@app.command()
def compare(runs: list[str] = typer.Argument(..., help="run directories or sweep directories"),
            as_json: bool = typer.Option(False, "--json", help="machine-readable rows")) -> None:
    """One table of each run's (or sweep variant's) key numbers: losses, tokens, evaluation, wall time."""
    from pipeline.compare import render, table

    try:
        rows = table(runs)
    except SeedlineError as e:
        _fail(e)
    typer.echo(json.dumps(rows, indent=1, sort_keys=True) if as_json else render(rows))


@app.command()
def gc(workdir: str = typer.Argument("runs", help="the workdir whose store to clean"),
       dry_run: bool = typer.Option(False, "--dry-run", help="only list what would be removed")) -> None:
    """Remove store entries (<workdir>/store/<type>-<fp>) that no run's run.json refers to."""
    from pipeline.store import collect

    doomed = collect(storage.resolve(workdir), dry_run=dry_run)
    for e in doomed:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {e}")
    typer.echo(f"{len(doomed)} unreferenced store entr{'y' if len(doomed) == 1 else 'ies'}"
               + (" (dry run)" if dry_run else ""))


def ui_url(uri: str, run: dict, port: int) -> str:
    """The URL of the run's experiment in the classic runs table (not the GenAI traces page)."""
    from mlflow.tracking import MlflowClient

    cfg = run.get("config") or {}
    name = (cfg.get("tracking") or {}).get("experiment") or cfg.get("name")
    exp = MlflowClient(uri).get_experiment_by_name(name) if name else None
    base = f"http://127.0.0.1:{port}/"
    view = "workflowType=machine_learning"  # the model-training sidebar, not the GenAI one
    return f"{base}#/experiments/{exp.experiment_id}/runs?compareRunsMode=TABLE&{view}" if exp else base


@app.command()
def ui(run_dir: str, port: int = 5000) -> None:
    """Start the MLflow UI on 127.0.0.1 for this run's tracking store."""
    import subprocess

    from pipeline.preflight import read_run_json

    try:
        data = read_run_json(run_dir) or {}
    except SeedlineError as e:
        _fail(e)
    uri = data.get("tracking_uri")
    if not uri:
        _fail(ConfigError("RUN_DIR", f"no tracking store recorded in {run_dir}/run.json"))
    import signal

    # One worker: a local UI needs no more, and uvicorn's supervisor of several kills a worker that is
    # slow to answer its health ping (seen on a loaded 2-core machine). No GenAI job runner: it starts
    # a dozen consumer processes a run browser never uses.
    url = ui_url(uri, data, port)
    typer.echo(f"MLflow: {url}  (Ctrl-C stops the server)", err=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              start_new_session=True, env=env)

    def stop(*_: object) -> None:  # the server and its workers go with us, on Ctrl-C or a SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        raise typer.Exit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        server.wait()
    except KeyboardInterrupt:
        stop()


@app.command()
def report(run_dir: str = typer.Argument(..., help="a run directory (<workdir>/<name>), or a sweep's")
           ) -> None:
    """Write RUN_DIR/report.html: stages, durations, dedupe stats, token counts, loss curves, evaluation
    (for a sweep: the variants side by side and their loss curves on shared axes)."""
    from pipeline.preflight import read_run_json
    from pipeline.report import write_report
    from pipeline.sweep import read_index

    try:
        if read_index(run_dir) is None:
            read_run_json(run_dir, required=True)
    except SeedlineError as e:
        _fail(e)
    typer.echo(write_report(run_dir))


@app.command("example-data")
def example_data(out_dir: Path) -> None:
    """Write the demo data (Python standard library docs, no download): corpus, instruction, preference
    and evaluation sets."""
    from pipeline.example_data import write_all

    typer.echo(write_all(out_dir))


# Hooks that command plugins provide (``cluster`` sets "resubmit": resume a run as a cluster job).
HOOKS: dict[str, Any] = {}
PLUGIN_GROUP = "seedline.commands"
DEFAULT_PLUGINS = ("cluster.cli:register", "stages.lm.cli:register")


def load_plugins(target: typer.Typer) -> None:
    """Add the commands of the ``seedline.commands`` entry points (the cluster's submit/jobs/logs/stop,
    the model stages' export): the CLI sits above the core, the stages and the cluster package, and the
    core imports neither. Without installed metadata (a bare checkout), the built-in plugins."""
    import importlib
    from importlib.metadata import entry_points

    targets = sorted({ep.value for ep in entry_points(group=PLUGIN_GROUP)}) or list(DEFAULT_PLUGINS)
    for t in targets:
        module, _, func = t.partition(":")
        try:
            register = getattr(importlib.import_module(module), func)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):  # that package is not installed here: no commands
                continue
            raise
        register(target)


def main() -> None:
    import logging

    from pipeline.redact import RedactingStream

    # Everything printed (messages, logs, Ray's forwarded worker output) passes the credential rule.
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    load_plugins(app)
    try:
        app()
    except SeedlineError as e:  # raised outside a command's own handling (e.g. a corrupt status file)
        try:
            _fail(e)
        except typer.Exit as done:
            sys.exit(done.exit_code)
