"""A multi-node Ray cluster on one machine, with an S3 endpoint and an MLflow server: the test bed for
Seedline's distributed path (``make cluster-up`` / ``make cluster-down``, and the multinode tests).

Every node is its own ``ray start --block`` process in its own process group, with its own temp dir (so
its node-local cache and its logs are its own, as on separate machines), 1 CPU and a custom resource
named after it (``node:w1`` style pinning: ``{"w1": 1}``); worker nodes also carry ``{"trainer": 1}``, the
resource a stage's ``scaling.resources`` names to keep its training workers off the head. Everything
binds to 127.0.0.1 and token auth is on. ``kill_node`` SIGKILLs a node's whole process group, which is
what losing a machine looks like to Ray. The S3 endpoint is a moto server (a dev dependency) and MLflow a
real ``mlflow server`` with a SQLite store that proxies artifacts.

The cluster's state (process ids, ports, addresses) is kept in ``<base>/cluster.json`` so another
process (``make cluster-down``) can stop it. Nothing secret is in it beyond the test token, which is also
in ``<base>/auth_token`` with mode 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.errors import ClusterError

STATE_FILE = "cluster.json"
TRAINER = "trainer"  # the custom resource of worker nodes (not the head)
ATTEMPTS = int(os.environ.get("SEEDLINE_NODE_START_ATTEMPTS", "6"))
# A throwaway cluster: its nodes get a moment to exit cleanly, then the rest is killed (with 10 s the test
# cluster's teardown took 16 s).
STOP_GRACE_S = 3.0
BUCKET = "seedline"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
# Ray and the job's environment must not inherit another cluster's address or token, nor the loopback-only
# switch a local Ray started earlier in this process set (pipeline.ray_init): with it a worker node
# refuses to join ("Multi-node Ray clusters are not supported").
CLEAR_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
             "RAY_AUTH_MODE", "PYTHONPATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@dataclass
class Node:
    """One ``ray start`` process group."""

    name: str
    pid: int
    temp_dir: str
    log: str
    head: bool = False


@dataclass
class LocalCluster:
    """A running local cluster; ``env()`` is the environment a Seedline client needs to use it."""

    base: str
    token: str
    gcs: str              # 127.0.0.1:PORT, what `ray start --address` joins
    dashboard: str        # http://127.0.0.1:PORT, the job API (`seedline submit --address`)
    s3_endpoint: str = ""
    mlflow_uri: str = ""
    nodes: dict[str, Node] = field(default_factory=dict)
    services: dict[str, int] = field(default_factory=dict)  # name -> pid of moto / mlflow

    def env(self, base_env: dict[str, str] | None = None) -> dict[str, str]:
        """``base_env`` (default: this process's) without Ray settings, plus the token, the address, and the
        S3 endpoint with its test keys."""
        env = {k: v for k, v in (base_env or os.environ).items() if k not in CLEAR_ENV}
        env.update(RAY_AUTH_TOKEN=self.token, RAY_API_SERVER_ADDRESS=self.dashboard, DS_ACCELERATOR="cpu")
        if self.s3_endpoint:
            env.update(S3_KEYS, AWS_ENDPOINT_URL_S3=self.s3_endpoint)
        return env

    def save(self) -> None:
        data = asdict(self)
        path = Path(self.base) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, base: str | Path) -> LocalCluster:
        data = json.loads((Path(base) / STATE_FILE).read_text())
        data["nodes"] = {k: Node(**v) for k, v in data["nodes"].items()}
        return cls(**data)

    # -- nodes ---------------------------------------------------------------------------------------
    def _node_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in CLEAR_ENV}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, DS_ACCELERATOR="cpu")
        # Jobs run `seedline ...`: the cluster's "image" is this environment.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        if self.s3_endpoint:
            env.update(S3_KEYS, AWS_ENDPOINT_URL_S3=self.s3_endpoint)
        return env

    def start_node(self, name: str, head: bool = False, num_cpus: int = 1, object_store_mb: int | None = 200,
                   temp_dir: str | None = None) -> Node:
        """Start node ``name`` (1 CPU and the custom resource ``{name: 1}``) and wait until it joined.
        Its temp dir is its own unless ``temp_dir`` is given."""
        if name in self.nodes and _alive(self.nodes[name].pid):
            raise ClusterError(f"node {name} is already running")
        # Ray gives a raylet 30 s to register (not configurable); on a loaded machine it can miss that, so a
        # node that fails to come up is started again from scratch, with new ports and a new temp dir (up
        # to ATTEMPTS times in all).
        for attempt in range(ATTEMPTS):
            try:
                return self._start(name, self._command(name, head, num_cpus, object_store_mb, temp_dir), head)
            except ClusterError:
                self.kill_node(name)
                if temp_dir is None:  # the failed attempt's own temp dir
                    shutil.rmtree(self.nodes[name].temp_dir, ignore_errors=True)
                if attempt == ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _command(self, name: str, head: bool, num_cpus: int, object_store_mb: int | None,
                 temp_dir: str | None) -> tuple[list[str], str]:
        # Unix socket paths under the temp dir must stay short: /tmp, not the (long) base dir.
        temp_dir = temp_dir or tempfile.mkdtemp(prefix=f"sl{name}-", dir="/tmp")
        resources = {name: 1} | ({} if head else {TRAINER: 1})
        cmd = [_bin("ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(num_cpus), "--resources", json.dumps(resources), "--temp-dir", temp_dir,
               "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port())]
        if object_store_mb:
            cmd += ["--object-store-memory", str(object_store_mb * 2**20)]
        if head:
            host, port = self.gcs.rsplit(":", 1)
            dash = self.dashboard.rsplit(":", 1)[1]
            cmd += ["--head", "--port", port, "--dashboard-host", host, "--dashboard-port", dash,
                    "--ray-client-server-port", str(free_port())]
        else:
            cmd += ["--address", self.gcs]
        return cmd, temp_dir

    def _start(self, name: str, command: tuple[list[str], str], head: bool) -> Node:
        cmd, temp_dir = command
        log = Path(self.base) / f"ray-{name}.log"
        before = 0 if head else _alive_nodes(self)
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=self._node_env(), stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.base, start_new_session=True)
        node = Node(name, proc.pid, temp_dir, str(log), head)
        self.nodes[name] = node
        self.save()
        if head:
            _wait_http(f"{self.dashboard}/api/version", proc.pid, log, self.token)
        _wait_for(lambda: _alive_nodes(self) > before, proc.pid, log, f"node {name} to join")
        return node

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill node ``name``'s whole process group (raylet, agents) and every process those started (Ray
        puts each worker in a process group of its own): a lost machine."""
        node = self.nodes[name]
        victims = _node_processes(node.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, sig)
        for proc in victims:
            with contextlib.suppress(Exception):
                proc.send_signal(sig)
        _reap(node.pid)

    def node_of_resource(self) -> dict[str, str]:
        """Ray node id -> node name (from the custom resource each node carries)."""
        out = {}
        for n in _ray_nodes(self):
            names = [k for k in n.get("resources_total", {}) if k in self.nodes and k != TRAINER]
            if names:
                out[n["node_id"]] = names[0]
        return out

    # -- whole cluster -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every node and service (SIGTERM, then SIGKILL of each process group); remove temp dirs."""
        pids = [n.pid for n in self.nodes.values()] + list(self.services.values())
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _reap(pid)
        for n in self.nodes.values():
            shutil.rmtree(n.temp_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (Path(self.base) / STATE_FILE).unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _node_processes(pgid: int) -> list:
    """The processes of process group ``pgid`` and all their descendants."""
    import psutil

    out = {}
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid:
                out[proc.pid] = proc
                out.update({c.pid: c for c in proc.children(recursive=True)})
    return list(out.values())


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, 0)


def _tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        return log.read_text()[-3000:]
    return ""


def _wait_for(ok, pid: int, log: Path, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            if ok():
                return
        if pid and not _alive(pid):
            raise ClusterError(f"waiting for {what}: the process exited:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"waiting for {what}: not ready after {timeout:.0f}s:\n{_tail(log)}")
        time.sleep(0.3)


def _get(url: str, token: str | None = None) -> bytes:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
        return r.read()


def _wait_http(url: str, pid: int, log: Path, token: str | None = None, timeout: float = 120) -> None:
    _wait_for(lambda: _get(url, token) is not None, pid, log, url, timeout)


def _ray_nodes(c: LocalCluster) -> list[dict]:
    """The State API's node list (alive and dead)."""
    data = json.loads(_get(f"{c.dashboard}/api/v0/nodes?limit=100&detail=true", c.token))
    return data["data"]["result"]["result"]


def _alive_nodes(c: LocalCluster) -> int:
    return sum(1 for n in _ray_nodes(c) if n.get("state") == "ALIVE")


def _start_service(c: LocalCluster, name: str, cmd: list[str], url: str, env: dict[str, str]) -> None:
    log = Path(c.base) / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=c.base,
                                start_new_session=True)
    c.services[name] = proc.pid
    c.save()
    _wait_http(url, proc.pid, log)


def start_s3(c: LocalCluster) -> None:
    """A moto S3 server on 127.0.0.1 with the bucket ``seedline``."""
    port = free_port()
    c.s3_endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, **S3_KEYS)
    _start_service(c, "s3", [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                   f"{c.s3_endpoint}/moto-api/", env)
    req = urllib.request.Request(f"{c.s3_endpoint}/{BUCKET}", method="PUT")
    urllib.request.urlopen(req, timeout=10).close()


def start_mlflow(c: LocalCluster) -> None:
    """An MLflow tracking server on 127.0.0.1: SQLite store, artifacts proxied to ``<base>/mlartifacts``."""
    port = free_port()
    c.mlflow_uri = f"http://127.0.0.1:{port}"
    base = Path(c.base)
    cmd = [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
           "--artifacts-destination", str(base / "mlartifacts")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    _start_service(c, "mlflow", cmd, f"{c.mlflow_uri}/health", env)


def start(base: str | Path, workers: int = 2, s3: bool = True, mlflow: bool = True) -> LocalCluster:
    """Start a head (``head``) and ``workers`` worker nodes (``w1``, ``w2``, ...), each with 1 CPU, plus
    the S3 endpoint and MLflow; stop everything again if any part fails to come up."""
    base = Path(base).resolve()
    base.mkdir(parents=True, exist_ok=True)
    if (base / STATE_FILE).exists():
        raise ClusterError(f"{base / STATE_FILE} exists: a cluster is running there (make cluster-down)",
                           exit_code=2)
    c = LocalCluster(str(base), secrets.token_hex(32), f"127.0.0.1:{free_port()}",
                     f"http://127.0.0.1:{free_port()}")
    token_file = base / "auth_token"
    token_file.write_text(c.token)
    token_file.chmod(0o600)
    try:
        if s3:
            start_s3(c)
        c.start_node("head", head=True)
        for i in range(1, workers + 1):
            c.start_node(f"w{i}")
        if mlflow:
            start_mlflow(c)
    except BaseException:
        c.stop()
        raise
    return c


def _main(argv: list[str]) -> int:
    """``python -m cluster.local_cluster up|down [DIR]``."""
    if not argv or argv[0] not in ("up", "down"):
        print("usage: python -m cluster.local_cluster up|down [DIR]", file=sys.stderr)
        return 2
    base = Path(argv[1] if len(argv) > 1 else ".seedline-cluster").resolve()
    if argv[0] == "down":
        if not (base / STATE_FILE).exists():
            print(f"no cluster in {base}", file=sys.stderr)
            return 0
        LocalCluster.load(base).stop()
        print(f"stopped the cluster in {base}", file=sys.stderr)
        return 0
    try:
        c = start(base)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"# 3-node Ray cluster, S3 and MLflow on 127.0.0.1 (state in {base}); use it with:")
    print(f"export RAY_API_SERVER_ADDRESS={c.dashboard}")
    print(f"export RAY_AUTH_TOKEN_PATH={base / 'auth_token'}")
    print(f"export AWS_ENDPOINT_URL_S3={c.s3_endpoint}")
    print(" ".join(f"export {k}={v}" for k, v in S3_KEYS.items()))
    print(f"# seedline submit configs/tiny.yaml --workdir s3://{BUCKET}/runs -s tracking.uri={c.mlflow_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
