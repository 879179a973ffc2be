"""Helpers of the cluster tests: a real Ray head with token auth, the `seedline` command, a corpus."""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# The `seedline` console script as `pip install` would create it (pyproject: pipeline.cli:main).
SHIM = f"""#!{sys.executable}
import sys
from pipeline.cli import main
sys.exit(main())
"""
CLEAR_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
             "RAY_AUTH_MODE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_shim(bin_dir: Path) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "seedline"
    shim.write_text(SHIM)
    shim.chmod(0o755)
    return shim


def run_seedline(bin_dir: Path, args: tuple[str, ...], env: dict[str, str], timeout: float = 240,
                 ) -> subprocess.CompletedProcess:
    """Run the `seedline` command as a user would."""
    return subprocess.run([str(bin_dir / "seedline"), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)


def client_env(home: Path, bin_dir: Path) -> dict[str, str]:
    """This process's environment without any Ray address or token, with a HOME of its own."""
    env = {k: v for k, v in os.environ.items() if k not in CLEAR_ENV}
    env.update(HOME=str(home), PATH=f"{bin_dir}:{VENV_BIN}:{env.get('PATH', '')}", PYTHONPATH=str(REPO))
    return env


@dataclass
class RayHead:
    address: str          # the dashboard / job API, http://127.0.0.1:PORT
    token: str
    env: dict[str, str]   # environment for Seedline clients: the token, a clean HOME, the shim on PATH
    bin_dir: Path

    def seedline(self, *args: str, env: dict[str, str] | None = None, timeout: float = 240,
                 ) -> subprocess.CompletedProcess:
        return run_seedline(self.bin_dir, args, env or self.env, timeout)


def _wait_up(url: str, token: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    req = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(req, timeout=2) as r:
            if r.status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray dashboard did not come up in {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def write_corpus(root: Path, docs: int = 600, seed: int = 5) -> str:
    """JSONL documents with exact and near duplicates; returns the input glob."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
             for _ in range(800)]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(40, 120))) for _ in range(docs)]
    texts += [t.upper() for t in texts[:40]]                       # exact (after normalisation)
    texts += [t + " " + rng.choice(vocab) for t in texts[40:80]]   # near
    root.mkdir(parents=True, exist_ok=True)
    for part in range(3):
        with open(root / f"part-{part}.jsonl", "w") as f:
            for i, t in enumerate(texts[part::3]):
                f.write(json.dumps({"id": f"{part}-{i}", "text": t}) + "\n")
    return str(root / "*.jsonl")


def pipeline_config(path: Path, name: str, workdir: str, data_glob: str, tracking: bool = True) -> Path:
    """The data stages (dedupe, tokenize) of a small pipeline."""
    cfg = {
        "name": name,
        "workdir": workdir,
        "tracking": {"enabled": tracking},
        "stages": {
            "dedupe": {"input": data_glob, "num_perm": 64},
            "tokenize": {"tokenizer": {"train": {"vocab_size": 400, "sample_docs": 300}}, "seq_len": 32,
                         "val_fraction": 0.1, "rows_per_shard": 256},
        },
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@contextlib.contextmanager
def start_ray_head(base: Path) -> Iterator[RayHead]:
    """A Ray head on 127.0.0.1 with token auth on, its own temp dir, token and HOME (nobody's
    ~/.ray/auth_token is used or overwritten), stopped through its process group at the end (never
    `ray stop`: other tests' Rays may be running)."""
    home, bin_dir = base / "home", base / "bin"
    home.mkdir()
    write_shim(bin_dir)
    token = secrets.token_hex(32)
    env = client_env(home, bin_dir)
    env.update(RAY_AUTH_TOKEN=token, SEEDLINE_LEASE_TTL="3", DS_ACCELERATOR="cpu")
    head_env = dict(env, RAY_AUTH_MODE="token")
    head_env.pop("PYTHONPATH")  # jobs import Seedline from the working directory they were sent
    # Ray's session dir holds unix sockets, whose paths must stay short.
    temp_dir = tempfile.mkdtemp(prefix="slray", dir="/tmp")
    dash = free_port()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
           "--temp-dir", temp_dir, "--object-store-memory", str(400 * 2**20),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
           "--runtime-env-agent-port", str(free_port())]
    log = base / "ray-head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=head_env, stdout=out, stderr=subprocess.STDOUT, cwd=base,
                                start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_up(url, token, proc, log)
        yield RayHead(url, token, env, bin_dir)
    finally:
        # `ray start --block` stops its processes on SIGTERM; then the group, for stragglers.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
