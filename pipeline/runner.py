"""Run a pipeline: skip finished stages, resume interrupted ones, re-run what changed.

Each stage runs in the driver process (its ``run`` function may fan work out to Ray). The driver owns
the stage's ``status.json`` and lease; the stage owns the rest of its directory.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import mlflow_run, run_logs, storage
from pipeline.config import PipelineConfig, resolved
from pipeline.errors import ConfigError, StageFailed, failure_details, failure_line
from pipeline.graph import Node, downstream, lineage, order
from pipeline.preflight import eval_data
from pipeline.redact import redact_obj
from pipeline.stage import Output, Progress, StageContext, handle
from pipeline.state import Lease, RunState, lease_alive, read_lease, read_progress, read_status, write_status
from pipeline.tracking import NullTracker, PipelineTracking

log = logging.getLogger("seedline")


def _bindings(nodes: list[Node]) -> dict[str, dict[str, list[str]]]:
    """``{instance: {slot: [upstream instances]}}`` for ``run.json`` (report sections follow them)."""
    return {n.name: {slot: list(names) for slot, names in n.bound.items() if names} for n in nodes}


@dataclass
class RunResult:
    """What happened to each stage: ``skipped`` (done in this run), ``reused`` (a store entry another run
    made), ``ran`` or ``waited`` (another driver ran it)."""

    run_dir: str
    outcomes: dict[str, str] = field(default_factory=dict)
    stage_dirs: dict[str, str] = field(default_factory=dict)


def git_sha() -> str | None:
    """The commit of the Seedline checkout (or ``SEEDLINE_GIT_SHA``, set where the code is not a checkout,
    e.g. a Docker image or a job's working-dir upload)."""
    if os.environ.get("SEEDLINE_GIT_SHA"):
        return os.environ["SEEDLINE_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent.parent,
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _selected(nodes: list[Node], only: str | None, from_stage: str | None) -> tuple[set[str], set[str]]:
    """(stages to consider, stages to force re-running)."""
    names = [n.name for n in nodes]
    for flag, value in (("--only", only), ("--from", from_stage)):
        if value and value not in names:
            raise ConfigError(flag, f"stage '{value}' is not in this pipeline (stages: {', '.join(names)})")
    if only:
        return {only}, set()
    if from_stage:
        forced = downstream(nodes, from_stage)
        return set(names), forced
    return set(names), set()


class Runner:
    """Drives one pipeline run; see ``run_pipeline``."""

    def __init__(self, cfg: PipelineConfig, show: Callable[[str], None] | None = None,
                 progress_factory: Callable[[str], Callable[[dict[str, Any]], None]] | None = None,
                 tags: dict[str, str] | None = None):
        self.cfg = cfg
        self.tags = dict(tags or {})
        self.state = RunState(cfg.run_dir())
        self.show = show or (lambda msg: log.info(msg))
        self.progress_factory = progress_factory
        self.tracking: PipelineTracking | None = None
        self.by_name: dict[str, Node] = {}
        self.parent_run_id: str | None = None

    def run(self, only: str | None = None, from_stage: str | None = None) -> RunResult:
        nodes = order(self.cfg)
        consider, forced = _selected(nodes, only, from_stage)
        result = RunResult(self.state.run_dir)
        self.by_name = {n.name: n for n in nodes}
        self.nodes = nodes
        todo = [n for n in nodes if n.name in consider]
        pending = [n for n in todo if n.name in forced or self._state(n) != "succeeded"]
        for n in todo:
            result.stage_dirs[n.name] = self.state.stage_dir(n.dirname)
        if not pending:  # a finished pipeline (or one made of reused entries): no tracking store, no Ray
            self._record_run(nodes)
            for n in todo:
                result.outcomes[n.name] = self._done(n)
            return result
        self._open_run(nodes)
        status = "FAILED"
        try:
            for node in todo:
                result.outcomes[node.name] = self._run_node(node, node.name in forced)
            status = "FINISHED"
        finally:
            if self.tracking and self.parent_run_id:
                mlflow_run.close_parent(self.tracking, self.parent_run_id, self.state.run_dir)
                self.tracking.finish(self.parent_run_id, status)
        return result

    def _state(self, node: Node) -> str:
        return read_status(self.state.stage_dir(node.dirname))["state"]

    def _producer(self, node: Node) -> str | None:
        """The run directory that made a finished store entry, when it is not this run."""
        made_by = read_status(self.state.stage_dir(node.dirname)).get("run_dir")
        return made_by if made_by and made_by != self.state.run_dir else None

    def _done(self, node: Node) -> str:
        producer = self._producer(node)
        if producer:
            self.show(f"{node.name}: reused {node.dirname} (made by run {producer})")
            return "reused"
        self.show(f"{node.name}: done ({node.dirname}), skipped")
        return "skipped"

    def _record_run(self, nodes: list[Node]) -> None:
        """Write ``run.json`` when it is new or records other store entries (a run of reused stages)."""
        data = self.state.load()
        entries = {n.name: self.state.entry(n.dirname) for n in nodes}
        inputs = _bindings(nodes)
        if data.get("stages") != entries or data.get("inputs") != inputs:
            storage.makedirs(self.state.run_dir)
            data.update(config=resolved(self.cfg), created=data.get("created") or time.time(),
                        updated=time.time(), git_sha=git_sha(), stages=entries, order=[n.name for n in nodes],
                        inputs=inputs)
            data.setdefault("mlflow_parent_run_id", None)
            data.setdefault("tracking_uri", self.cfg.tracking_uri() if self.cfg.tracking.enabled else None)
            self.state.save(data)

    def _open_run(self, nodes: list[Node]) -> None:
        storage.makedirs(self.state.run_dir)
        run_logs.open_run(self.state.run_dir)
        data = self.state.load()
        if self.cfg.tracking.enabled:
            experiment = self.cfg.tracking.experiment or self.cfg.name
            uri = self.cfg.tracking_uri()
            # A database store keeps artifacts beside the runs it describes; a server decides for itself.
            artifacts = None if uri.startswith("http") else storage.join(self.cfg.workdir, "mlartifacts")
            self.tracking = PipelineTracking(uri, experiment, artifacts)
            tags = {"seedline.run_dir": self.state.run_dir, "seedline.git_sha": git_sha() or "unknown",
                    **self.tags}
            self.parent_run_id = self.tracking.parent(data.get("mlflow_parent_run_id"), self.cfg.name, tags)
        attempt = int(data.get("attempts", 0)) + 1
        if self.parent_run_id:
            mlflow_run.open_parent(self.tracking, self.parent_run_id, self.cfg.name, attempt,
                                   resolved(self.cfg))
        data.update(
            attempts=attempt,
            config=resolved(self.cfg),
            created=data.get("created") or time.time(),
            updated=time.time(),
            git_sha=git_sha(),
            mlflow_parent_run_id=self.parent_run_id,
            tracking_uri=self.cfg.tracking_uri() if self.cfg.tracking.enabled else None,
            stages={n.name: self.state.entry(n.dirname) for n in nodes},
            order=[n.name for n in nodes],  # pipeline order (JSON objects are written with sorted keys)
            inputs=_bindings(nodes),
        )
        self.state.save(data)

    def _run_node(self, node: Node, force: bool) -> str:
        sdir = self.state.stage_dir(node.dirname)
        for dep in node.inputs:
            dep_dir = self.state.stage_dir(self.by_name[dep].dirname)
            if read_status(dep_dir)["state"] != "succeeded":
                raise StageFailed(f"{node.name}: upstream stage '{dep}' has not succeeded; run it first")
        if not force and read_status(sdir)["state"] == "succeeded":
            outcome = self._done(node)
            if outcome == "reused":
                self._tag_reused(node, sdir)
            return outcome
        lease = Lease(sdir)
        if not lease.try_acquire():
            return self._wait_for_other(node, sdir, lease)
        try:
            if force:
                self._clear(sdir)
            elif read_status(sdir)["state"] == "succeeded":
                # another driver ran it between the check above and our lease: it must not run twice
                return "waited"
            return self._execute(node, sdir, lease)
        finally:
            lease.release()

    def _wait_for_other(self, node: Node, sdir: str, lease: Lease) -> str:
        """Another live driver runs this stage: wait for it; take over if it dies."""
        self.show(f"{node.name}: running in another driver ({read_lease(sdir)['owner']}), waiting")
        while True:
            time.sleep(0.5)
            state = read_status(sdir)["state"]
            if state == "succeeded":
                return "waited"
            if (state == "failed" or not lease_alive(read_lease(sdir))) and lease.try_acquire():
                try:
                    return self._execute(node, sdir, lease, resume_only=True)
                finally:
                    lease.release()

    def _clear(self, sdir: str) -> None:
        for name in storage.listdir(sdir):
            if name not in ("lease.json", "lease.lock", "status.json"):
                storage.remove(storage.join(sdir, name), recursive=True)

    def _execute(self, node: Node, sdir: str, lease: Lease, resume_only: bool = False) -> str:
        if resume_only and read_status(sdir)["state"] == "succeeded":
            return "waited"
        prev = read_status(sdir)
        resumed = prev["state"] in ("running", "failed")
        storage.write_json(storage.join(sdir, "config.json"), redact_obj(node.config.model_dump(mode="json")))
        tracker = self._tracker(node, prev.get("mlflow_run_id"))
        status = {
            "state": "running", "stage": node.name, "type": node.type, "fingerprint": node.fingerprint,
            "run_dir": self.state.run_dir,
            "started": prev.get("started") or time.time(), "finished": None,
            "attempts": int(prev.get("attempts", 0)) + 1, "mlflow_run_id": tracker.run_id,
            "progress": prev.get("progress", {}), "error": None,
        }
        write_status(sdir, status)
        self.show(f"{node.name}: {'resuming' if resumed else 'running'} in {node.dirname}")
        progress = Progress(storage.join(sdir, "progress.json"))
        if self.progress_factory:
            progress.listeners.append(self.progress_factory(node.name))
        lease.on_beat = lambda: self._fold_progress(sdir, status, progress)
        ctx = self._context(node, sdir, tracker, progress)
        if not prev.get("mlflow_run_id"):  # a new stage run: what it reads, once
            mlflow_run.stage_inputs(tracker, ctx.inputs)
        run_logs.stage_started(self.state.run_dir, node.name)
        try:
            node.spec.load_run()(node.config, ctx)
        except BaseException as e:
            lease.on_beat = None
            run_logs.stage_ended(self.state.run_dir, node.name)
            # One line for status.json and the terminal; the whole traceback (no colour codes, no
            # credentials) in error.txt.
            reason = "lease lost to another driver" if lease.lost else failure_line(e)
            status.update(state="failed", error=reason, finished=time.time())
            storage.write_text(storage.join(sdir, "error.txt"), failure_details(e))
            write_status(sdir, status)
            tracker.close("FAILED")
            if isinstance(e, Exception):
                raise StageFailed(f"stage '{node.name}' failed: {reason} (details: {sdir}/error.txt)") from e
            raise
        lease.on_beat = None
        run_logs.stage_ended(self.state.run_dir, node.name)
        self._fold_progress(sdir, status, progress)  # the last update (a short stage's only one)
        progress = read_progress(sdir) or status["progress"]
        status.update(state="succeeded", finished=time.time(), progress=progress)
        mlflow_run.stage_artifacts(tracker, sdir, node.spec.outputs)
        tracker.close("FINISHED")
        write_status(sdir, status)  # the success marker comes last
        self.show(f"{node.name}: succeeded in {status['finished'] - status['started']:.1f}s")
        return "ran"

    def _tag_reused(self, node: Node, sdir: str) -> None:
        """An MLflow child run for a reused stage, pointing at the run (and MLflow run) that made it."""
        if not self.tracking or not self.parent_run_id:
            return
        status = read_status(sdir)
        tags = {"seedline.stage": node.name, "seedline.type": node.type,
                "seedline.fingerprint": node.fingerprint, "seedline.run_dir": self.state.run_dir,
                "seedline.reused": "true", "seedline.reused_from": status.get("run_dir") or "",
                "seedline.reused_mlflow_run_id": status.get("mlflow_run_id") or ""}
        data = self.state.load()
        known = data.get("reused_mlflow_runs", {}).get(node.name)
        tracker = self.tracking.child(self.parent_run_id, known, node.name, tags)
        if tracker.run_id and known != tracker.run_id:  # a resumed run re-opens the same child run
            data.setdefault("reused_mlflow_runs", {})[node.name] = tracker.run_id
            self.state.save(data)
        tracker.close("FINISHED")

    def _fold_progress(self, sdir: str, status: dict[str, Any], progress: Progress) -> None:
        latest = read_progress(sdir)
        if latest and latest != status.get("progress"):
            status["progress"] = latest
            write_status(sdir, status)
            for cb in progress.listeners:
                cb(latest)

    def _tracker(self, node: Node, run_id: str | None):
        if not self.tracking or not self.parent_run_id:
            return NullTracker()
        tags = {"seedline.stage": node.name, "seedline.type": node.type,
                "seedline.fingerprint": node.fingerprint,
                "seedline.run_dir": self.state.run_dir, "seedline.git_sha": git_sha() or "unknown"}
        tracker = self.tracking.child(self.parent_run_id, run_id, node.name, tags)
        tracker.log_params(node.config.model_dump(mode="json"))
        return tracker

    def _context(self, node: Node, sdir: str, tracker: Any, progress: Progress) -> StageContext:
        inputs: dict[str, list[Output]] = {}
        for slot, names in node.bound.items():
            kind = node.spec.inputs[slot].kind
            inputs[slot] = [self._output(self.by_name[n], kind) for n in names]
        logger = logging.getLogger(f"seedline.{node.name}")
        return StageContext(
            name=node.name, out_dir=sdir, run_dir=self.state.run_dir, fingerprint=node.fingerprint,
            inputs=inputs, tracker=tracker, progress=progress, logger=logger,
            ray_address=self.cfg.ray.address, ray_num_cpus=self.cfg.ray.num_cpus,
            lineage=lineage(self.nodes, node.name), type=node.type,
            eval_data=eval_data({n.name: n.config for n in self.nodes}),
            extra={"upstream": {n: {"type": self.by_name[n].type,
                                    "config": self.by_name[n].config.model_dump(mode="json")}
                                for n in lineage(self.nodes, node.name)}},
        )

    def _output(self, up: Node, kind: str) -> Output:
        """A handle on the ``kind`` output of the finished instance ``up``, at the path it declared."""
        d = self.state.stage_dir(up.dirname)
        config = storage.read_json(storage.join(d, "config.json"))
        return handle(up.type, d, kind, up.name, up.fingerprint, config, up.bound)


def run_pipeline(cfg: PipelineConfig, only: str | None = None, from_stage: str | None = None,
                 show: Callable[[str], None] | None = None,
                 progress_factory: Callable[[str], Callable[[dict[str, Any]], None]] | None = None,
                 tags: dict[str, str] | None = None) -> RunResult:
    """Run (or resume) the pipeline ``cfg``; ``tags`` go on its MLflow parent run. Raises ``StageFailed``
    when a stage fails."""
    return Runner(cfg, show, progress_factory, tags).run(only=only, from_stage=from_stage)
