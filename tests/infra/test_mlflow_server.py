"""The MLflow server as infra/mlflow/entrypoint.sh starts it (SQLite and a local artifact root standing
in for PostgreSQL and MinIO): basic auth is on, and Seedline's tracking client logs through it with
the credentials from the environment, artifacts included (proxied by the server)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

ENTRYPOINT = Path(__file__).resolve().parents[2] / "infra" / "mlflow" / "entrypoint.sh"
PASSWORD = "admin-password-for-tests"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, user: str | None = None, password: str | None = None) -> int:
    headers = {}
    if user:
        headers["Authorization"] = "Basic " + b64encode(f"{user}:{password}".encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # not listening yet
        return 0


def test_tracking_server_requires_basic_auth_and_serves_artifacts(tmp_path, monkeypatch):
    port = _free_port()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path}/mlflow.db",
               MLFLOW_AUTH_DATABASE_URI=f"sqlite:///{tmp_path}/auth.db",
               MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "artifacts"),
               MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key",
               MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port), MLFLOW_WORKERS="1",
               MLFLOW_ALLOWED_HOSTS="127.0.0.1:*")
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(["sh", str(ENTRYPOINT)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while _get(f"{base}/health") != 200:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow server did not start"
            time.sleep(0.5)
        api = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _get(api) == 401
        assert _get(api, "admin", "wrong-password") == 401
        assert _get(api, "admin", PASSWORD) == 200

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=base)
        run = client.create_run(client.create_experiment("seedline-infra"))
        client.log_metric(run.info.run_id, "loss", 1.5, step=1)
        note = tmp_path / "note.txt"
        note.write_text("through the server")
        client.log_artifact(run.info.run_id, str(note))
        assert client.get_metric_history(run.info.run_id, "loss")[0].value == 1.5
        stored = list((tmp_path / "artifacts").rglob("note.txt"))
        assert [p.read_text() for p in stored] == ["through the server"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
