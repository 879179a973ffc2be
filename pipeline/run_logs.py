"""Where a run's output goes: Seedline's own lines to the console, everything else to ``<run>/logs/``.

``seedline run`` (and ``resume``) wrap the run in ``capture()``. Inside it the process's stdout and stderr
(file descriptors 1 and 2, so C++ output of Ray and torch and the output of child processes too) go
through a pipe to this module, which writes each line to the log of the stage that is running
(``<run>/logs/<stage>.log``) or, between stages, to ``<run>/logs/driver.log``. Ray's forwarded worker
output (training workers on any node, Ray Data tasks) is routed the same way, with its ``(actor pid=..)``
prefix; lines a worker marks as Seedline's own (``MARK``, e.g. the training step lines) are also shown on
the console without it. The console gets Seedline's messages (the ``seedline`` logger), the progress bars
and the end-of-run summary; ``verbose`` shows everything there too. Log files never hold credentials
(``pipeline.redact``) nor ANSI codes; the console gets ANSI codes only when it is a terminal.
With an object-store run directory the logs are written locally and uploaded when each stage ends and
when the run ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

MARK = "[seedline] "  # a worker's line meant for the user's console
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
DRIVER = "driver"


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


class _Log:
    """One log file: written locally, uploaded to ``url`` (object-store run directories) on ``sync``."""

    def __init__(self, run_dir: str, name: str):
        from pipeline import storage

        self.url = storage.join(run_dir, "logs", f"{name}.log")
        local = storage.local(self.url)
        if local is None:
            local = Path(tempfile.mkdtemp(prefix="seedline-logs-")) / f"{name}.log"
        local.parent.mkdir(parents=True, exist_ok=True)
        self.path = local
        self.remote = storage.local(self.url) is None
        if self.remote and storage.exists(self.url):  # a resumed run: its log goes on
            local.write_bytes(storage.read_bytes(self.url))
        self.file: IO[str] = open(local, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 (closed by close())

    def write(self, line: str) -> None:
        from pipeline.redact import redact_text

        self.file.write(redact_text(line))  # a worker's traceback may quote a URL with credentials
        self.file.flush()

    def sync(self) -> None:
        """Upload the file (a no-op on a local run directory)."""
        if self.remote:
            from pipeline import storage

            storage.write_bytes(self.url, self.path.read_bytes())

    def close(self) -> None:
        self.file.close()
        self.sync()


class Router:
    """Routes output lines to the running stages' logs and Seedline's lines to the console."""

    def __init__(self, console: IO[str], verbose: bool):
        self.console = console
        self.verbose = verbose
        self.colour = console.isatty()
        self.lock = threading.RLock()
        self.runs: dict[str, _Log] = {}  # run dir -> driver.log
        self.stages: dict[tuple[str, str], _Log] = {}  # (run dir, stage) -> <stage>.log
        self.early: list[str] = []  # lines before any run directory is known
        self.drain = lambda: None  # set by capture(): wait until the pipe holds nothing written so far

    def _to_console(self, text: str) -> None:
        self.console.write(text if self.colour else strip_ansi(text))
        self.console.flush()

    def _targets(self) -> list[_Log]:
        return list(self.stages.values()) or list(self.runs.values())

    def write(self, text: str) -> None:
        """Output that is not Seedline's: to the logs (and the console when verbose)."""
        with self.lock:
            targets = self._targets()
            plain = strip_ansi(text)
            if targets:
                for log in targets:
                    log.write(plain)
            else:
                self.early.append(plain)
            if self.verbose:
                self._to_console(text)

    def say(self, text: str) -> None:
        """A line of Seedline's from elsewhere (a worker): to the console and the logs."""
        with self.lock:
            self._to_console(text)
            for log in self._targets():
                log.write(strip_ansi(text))

    def open_run(self, run_dir: str) -> None:
        self.drain()
        with self.lock:
            if run_dir not in self.runs:
                self.runs[run_dir] = log = _Log(run_dir, DRIVER)
                for line in self.early:
                    log.write(line)
                self.early.clear()

    def stage_started(self, run_dir: str, name: str) -> None:
        self.open_run(run_dir)  # drains the pipe: what was written before the stage is not its output
        with self.lock:
            self.stages[(run_dir, name)] = _Log(run_dir, name)

    def stage_ended(self, run_dir: str, name: str) -> None:
        self.drain()
        with self.lock:
            log = self.stages.pop((run_dir, name), None)
        if log is not None:
            log.close()

    def close(self) -> None:
        with self.lock:
            logs = [*self.stages.values(), *self.runs.values()]
            self.stages.clear()
            self.runs.clear()
        for log in logs:
            log.close()


_router: Router | None = None


def stage_started(run_dir: str, name: str) -> None:
    """The runner starts stage ``name``: output goes to its log from now on (when captured)."""
    if _router is not None:
        _router.stage_started(run_dir, name)


def stage_ended(run_dir: str, name: str) -> None:
    """Stage ``name`` ended (either way): its log is closed (and uploaded)."""
    if _router is not None:
        _router.stage_ended(run_dir, name)


def open_run(run_dir: str) -> None:
    """A run starts writing in ``run_dir``: output between stages goes to its ``logs/driver.log``."""
    if _router is not None:
        _router.open_run(run_dir)


def console() -> IO[str]:
    """The console while output is captured (else stderr): for progress bars and end-of-run lines."""
    return _router.console if _router is not None else sys.stderr


class _Pipe:
    """The pipe stdout and stderr write into, read a line at a time into the router by a daemon thread
    (Ray's child processes keep it open, and their last lines may come after the capture ends)."""

    BARRIER = b"\x00seedline-drained\n"

    def __init__(self, router: Router):
        self.router = router
        self.read_fd, self.write_fd = os.pipe()
        self.drained = threading.Event()
        threading.Thread(target=self._pump, name="seedline-logs", daemon=True).start()

    def drain(self, timeout: float = 5.0) -> None:
        """Return once everything written to the pipe before this call is routed (a marker line through
        it), so output lands in the log of the stage that was running when it was written."""
        self.drained.clear()
        os.write(self.write_fd, self.BARRIER)
        self.drained.wait(timeout)

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if line + b"\n" == self.BARRIER:
                    self.drained.set()
                elif b"\x00seedline-drained" in line:  # the marker after a partial line without a newline
                    self.router.write(line.replace(b"\x00seedline-drained", b"").decode("utf-8", "replace")
                                      + "\n")
                    self.drained.set()
                else:
                    self.router.write(line.decode("utf-8", "replace") + "\n")


class _SeedlineHandler(logging.Handler):
    """Seedline's own log records: to the console and the current log, at once (not through the pipe, so
    a stage's first line is in its own log)."""

    def __init__(self, router: Router):
        super().__init__(logging.INFO)
        self.router = router

    def emit(self, record: logging.LogRecord) -> None:
        self.router.say(self.format(record) + "\n")


@contextlib.contextmanager
def capture(verbose: bool = False) -> Iterator[Router]:
    """Route this process's output as the module docstring says, until the block ends."""
    global _router
    from pipeline.redact import RedactingStream

    for s in (sys.stdout, sys.stderr):
        s.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    console = RedactingStream(open(os.dup(saved[2]), "w", buffering=1, encoding="utf-8",  # noqa: SIM115
                                   errors="replace"))
    router = Router(console, verbose)
    pipe = _Pipe(router)
    router.drain = pipe.drain
    for fd in (1, 2):
        os.dup2(pipe.write_fd, fd)
    handler = _SeedlineHandler(router)
    handler.setFormatter(logging.Formatter("%(message)s"))
    seedline = logging.getLogger("seedline")
    seedline.addHandler(handler)
    propagate, seedline.propagate = seedline.propagate, False
    _router = router
    try:
        yield router
    finally:
        for s in (sys.stdout, sys.stderr):
            s.flush()
        seedline.removeHandler(handler)
        seedline.propagate = propagate
        for fd, dup in saved.items():
            os.dup2(dup, fd)
            os.close(dup)
        _router = None
        router.close()
        console.flush()
        console._inner.close()


def attach_ray() -> None:
    """Route Ray's forwarded worker output through the router (after ``ray.init(log_to_driver=True)``)."""
    router = _router
    if router is None:
        return
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("seedline_logs")
    dispatcher.add_handler("seedline_logs", lambda data: _worker_lines(router, data))


def _worker_lines(router: Router, data: dict[str, Any]) -> None:
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # its periodic status table: only the events, as Ray shows them
        from ray._private.worker import filter_autoscaler_events

        lines = list(filter_autoscaler_events(lines))
    who = data.get("actor_name") or data.get("task_name") or "worker"
    where = f", ip={data['ip']}" if data.get("ip") and data.get("ip") != data.get("localhost") else ""
    prefix = f"({who} pid={data.get('pid')}{where}) "
    for line in lines:
        at = line.find(MARK)
        if at >= 0:
            router.say(line[at + len(MARK):] + "\n")
        else:
            router.write(prefix + line + "\n")


def mark_worker_logs() -> None:
    """In a Ray worker: Seedline's log lines go to stderr marked for the driver's console (``MARK``),
    once, and not also through the worker's root logger."""
    seedline = logging.getLogger("seedline")
    if any(getattr(h, "_seedline_mark", False) for h in seedline.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(MARK + "%(message)s"))
    handler._seedline_mark = True  # type: ignore[attr-defined]
    seedline.addHandler(handler)
    seedline.setLevel(logging.INFO)
    seedline.propagate = False
