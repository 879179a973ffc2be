"""Run state on disk: ``run.json``, per-stage ``status.json`` and the lease that keeps two drivers from
running one stage at the same time.

A lease is ``lease.json`` beside ``status.json``: an owner id and a heartbeat time. A lease whose
heartbeat is older than the stale timeout belongs to a dead driver and is taken over. On a local
filesystem the read-check-write of the lease happens under an ``O_EXCL`` lock file, so two drivers can
never both win; on object stores (no exclusive create) the winner is checked by reading back.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from pipeline import storage

STATES = ("pending", "running", "succeeded", "failed")


def lease_ttl() -> float:
    """Seconds after which a silent lease is stale (env ``SEEDLINE_LEASE_TTL``, default 60)."""
    return float(os.environ.get("SEEDLINE_LEASE_TTL", "60"))


def _now() -> float:
    return time.time()


def read_status(stage_dir: str) -> dict[str, Any]:
    """The stage's ``status.json`` (``{"state": "pending"}`` when it has not started); a corrupt one is a
    ``CorruptFile`` error naming it."""
    from pipeline.preflight import read_json_file

    return read_json_file(storage.join(stage_dir, "status.json"), {"state": "pending"})


def write_status(stage_dir: str, status: dict[str, Any]) -> None:
    from pipeline.redact import redact_obj

    storage.write_json(storage.join(stage_dir, "status.json"), redact_obj(status))


def read_progress(stage_dir: str) -> dict[str, Any]:
    return storage.read_json_or(storage.join(stage_dir, "progress.json"), {})


def read_lease(stage_dir: str) -> dict[str, Any] | None:
    return storage.read_json_or(storage.join(stage_dir, "lease.json"), None)


def lease_alive(lease: dict[str, Any] | None) -> bool:
    return bool(lease) and _now() - float(lease["heartbeat"]) < lease_ttl()


@contextlib.contextmanager
def _mutex(stage_dir: str) -> Iterator[None]:
    """Short exclusive section around a lease read-modify-write (local filesystems)."""
    p = storage.local(stage_dir)
    if p is None:
        yield
        return
    p.mkdir(parents=True, exist_ok=True)
    lock = p / "lease.lock"
    deadline = time.monotonic() + 30
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            # A driver killed inside this few-millisecond section leaves the file behind.
            with contextlib.suppress(FileNotFoundError):
                if _now() - lock.stat().st_mtime > 10:
                    lock.unlink()
                    continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not lock {lock}") from None
            time.sleep(0.05)
    try:
        os.close(fd)
        yield
    finally:
        lock.unlink()


class Lease:
    """Ownership of one stage directory by one driver, kept alive by a heartbeat thread."""

    def __init__(self, stage_dir: str, on_beat: Callable[[], None] | None = None):
        self.stage_dir = stage_dir
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.on_beat = on_beat
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self) -> bool:
        """Take the lease if it is free, ours, or stale. False if another live driver holds it."""
        with _mutex(self.stage_dir):
            current = read_lease(self.stage_dir)
            if current and current["owner"] != self.owner and lease_alive(current):
                return False
            self._write()
        if storage.local(self.stage_dir) is None:
            time.sleep(0.5)  # object stores: last writer wins; read back to see who did
            current = read_lease(self.stage_dir)
            if not current or current["owner"] != self.owner:
                return False
        self._thread = threading.Thread(target=self._beat, name="seedline-lease", daemon=True)
        self._thread.start()
        return True

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        with _mutex(self.stage_dir):
            current = read_lease(self.stage_dir)
            if current and current["owner"] == self.owner:
                storage.remove(storage.join(self.stage_dir, "lease.json"))

    def _write(self) -> None:
        lease = {"owner": self.owner, "heartbeat": _now()}
        storage.write_json(storage.join(self.stage_dir, "lease.json"), lease)

    def _beat(self) -> None:
        interval = max(lease_ttl() / 4, 0.2)
        while not self._stop.wait(interval):
            with _mutex(self.stage_dir):
                current = read_lease(self.stage_dir)
                if current and current["owner"] != self.owner:
                    self.lost = True
                else:
                    self._write()
            if self.lost:
                # Another driver took the stage over (we were presumed dead): stop working on it now,
                # rather than let two drivers write the same outputs.
                _thread.interrupt_main()
                return
            if self.on_beat:
                self.on_beat()


STORE = "store"


def workdir_of(run_dir: str) -> str:
    """The workdir holding ``run_dir`` (``<workdir>/<name>``)."""
    return run_dir.rstrip("/").rsplit("/", 1)[0]


def entry_dir(run_dir: str, entry: str) -> str:
    """Where a ``run.json`` stage entry lives: ``store/<type>-<fp>`` is relative to the workdir (shared by
    every run in it); a bare name is a directory of the run itself (runs made before the store)."""
    return storage.join(workdir_of(run_dir), entry) if "/" in entry else storage.join(run_dir, entry)


def recorded_stage_dirs(run_dir: str, run: dict[str, Any] | None = None) -> dict[str, str]:
    """``{instance: directory}`` recorded in the run's ``run.json``, in pipeline order."""
    run = run if run is not None else storage.read_json_or(storage.join(run_dir, "run.json"), {})
    stages = run.get("stages") or {}
    known = [n for n in run.get("order") or [] if n in stages]
    order = known + sorted(set(stages) - set(known))
    return {name: entry_dir(run_dir, stages[name]) for name in order}


class RunState:
    """The run directory ``<workdir>/<name>`` and the store ``<workdir>/store`` its stages use."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.workdir = workdir_of(run_dir)

    @property
    def run_json(self) -> str:
        return storage.join(self.run_dir, "run.json")

    def load(self) -> dict[str, Any]:
        return storage.read_json_or(self.run_json, {})

    def save(self, data: dict[str, Any]) -> None:
        """Write ``run.json``; credentials never reach it (``pipeline.redact``)."""
        from pipeline.redact import redact_obj

        storage.write_json(self.run_json, redact_obj(data))

    @staticmethod
    def entry(dirname: str) -> str:
        """The ``run.json`` entry of a store directory name."""
        return f"{STORE}/{dirname}"

    def stage_dir(self, dirname: str) -> str:
        return storage.join(self.workdir, STORE, dirname)
