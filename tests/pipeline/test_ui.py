"""`seedline ui`: prints the URL of the runs table and takes the MLflow server down with it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from pipeline.config import validate_config
from pipeline.runner import run_pipeline

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_prints_the_runs_url_and_sigterm_stops_the_server(tmp_path):
    import tests.pipeline.test_core  # noqa: F401  (registers the t_a/t_b test stages)

    res = run_pipeline(validate_config({"name": "uirun", "workdir": str(tmp_path / "w"),
                                        "stages": {"t_a": {"n": 1}}}))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ui", res.run_dir, "--port", str(port)],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # the first line, before the server's own
        assert line.startswith("MLflow: ") and f"http://127.0.0.1:{port}/#/experiments/" in line
        assert "/runs" in line
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.time() < deadline, "the MLflow server did not come up"
                time.sleep(1)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, [p.cmdline() for p in alive]
    finally:  # never leave a server behind, whatever failed
        for p in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            p.kill()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
