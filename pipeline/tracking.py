"""MLflow tracking: one parent run per pipeline run, one nested child run per stage.

Metrics from hot loops are buffered and sent with ``log_batch`` from a background thread, so a
training step never waits on the tracking store. ``mlflow`` is imported lazily: ``seedline status``
must stay fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.redact import redact_value

_MAX_PARAM_LEN = 6000


def redact(key: str, value: Any) -> str:
    """A parameter value safe to store (``pipeline.redact``'s rule), cut to MLflow's length limit."""
    return str(redact_value(key, value))[:_MAX_PARAM_LEN]


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for servers and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):]
    return None if not path or path == ":memory:" else Path(path)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive use of a SQLite tracking store while it is created and its experiment looked up.

    Two drivers starting on a fresh workdir would otherwise both run MLflow's schema migration (one fails
    with alembic's "Online migration expected to match one row") or both create the experiment. The lock
    is an ``flock`` on ``<db>.lock``: released by the kernel if its holder dies.
    """
    db = _sqlite_file(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{db}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj} if prefix else {}


class NullTracker:
    """Used when tracking is off: every call does nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, obj: Any, artifact_file: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def start_system_metrics(self) -> None: ...
    def flush(self) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...

    def spec(self) -> dict[str, Any]:
        return {"enabled": False}


class Tracker:
    """Logs to one MLflow run. Picklable through ``spec()`` / ``tracker_from_spec``."""

    def __init__(self, uri: str, run_id: str, flush_interval: float = 2.0, max_buffer: int = 900):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=uri)
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self._buffer: list[Any] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._sysmon = None
        self._thread = threading.Thread(target=self._loop, name="seedline-tracker", daemon=True)
        self._thread.start()

    def spec(self) -> dict[str, Any]:
        return {"enabled": True, "uri": self.uri, "run_id": self.run_id}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Queue metrics; they are sent in batches by the background thread."""
        from mlflow.entities import Metric

        self._raise_pending()
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()]
        with self._lock:
            self._buffer.extend(items)
            full = len(self._buffer) >= self.max_buffer
        if full:
            self._wake.set()

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k[:250], redact(k, v)) for k, v in flatten(params).items() if k[:250] not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100], synchronous=True)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, redact(k, v))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(local_path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(artifact_file).name
            p.write_text(text)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(self.run_id, str(p), None if parent == "." else parent)

    def start_system_metrics(self) -> None:
        """CPU, memory (and GPU where pynvml finds one) sampled into this run."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        if self._sysmon is None:
            # The URI is passed explicitly: in a Ray worker the process-wide default is not this store.
            self._sysmon = SystemMetricsMonitor(self.run_id, sampling_interval=5, samples_before_logging=1,
                                                resume_logging=True, tracking_uri=self.uri)
            self._sysmon.start()

    def flush(self) -> None:
        """Send everything queued so far (blocks)."""
        with self._lock:
            batch, self._buffer = self._buffer, []
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000], synchronous=True)
        self._raise_pending()

    def close(self, status: str | None = None) -> None:
        """Flush, stop the background thread, and optionally mark the run terminated."""
        if not self._closed:
            self._closed = True
            self._wake.set()
            self._thread.join(timeout=30)
            if self._sysmon is not None:
                self._sysmon.finish()
                self._sysmon = None
        self.flush()
        if status:
            self.client.set_terminated(self.run_id, status)

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            try:
                self.flush()
            except BaseException as e:  # surfaced on the next call from the owning thread
                self._error = e
                return

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"MLflow logging failed for run {self.run_id}") from err


def tracker_from_spec(spec: dict[str, Any]) -> Tracker | NullTracker:
    """Rebuild a tracker in another process (e.g. a Ray Train worker)."""
    if not spec.get("enabled"):
        return NullTracker()
    return Tracker(spec["uri"], spec["run_id"])


class PipelineTracking:
    """Creates or re-attaches the pipeline's parent run and its per-stage child runs."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        """``artifact_location`` is where a new experiment keeps artifacts; without one MLflow would use
        ``./mlruns`` of whatever directory the command runs in (a server picks its own)."""
        from mlflow.tracking import MlflowClient

        self.uri = uri
        with store_lock(uri):
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment(experiment, artifact_location)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        """The experiment's id, created if needed; a server shared with another driver may create it
        between the look-up and the creation, which is fine."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def parent(self, run_id: str | None, name: str, tags: dict[str, str]) -> str:
        """The parent run id: the recorded one re-opened, or a new run."""
        if run_id and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def child(self, parent_id: str, run_id: str | None, name: str, tags: dict[str, str]) -> Tracker:
        """A tracker on the stage's child run (re-attached on resume, so steps stay monotonic)."""
        if run_id and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {**tags, "mlflow.parentRunId": parent_id}
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        return Tracker(self.uri, run_id)

    def finish(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False
