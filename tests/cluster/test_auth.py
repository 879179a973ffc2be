"""Token discovery and the address check: an unauthenticated submission to another machine is refused
before anything is sent; ``--insecure`` lets it through with a warning."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from cluster_helpers import client_env, pipeline_config, run_seedline, write_shim

from cluster import auth
from cluster.errors import ClusterError


def _clear_tokens(monkeypatch, home: Path) -> None:
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(home))


def test_token_sources_in_rays_order(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    _clear_tokens(monkeypatch, home)
    assert auth.find_token() is None

    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert auth.find_token().value == "from-home"

    named = tmp_path / "named_token"
    named.write_text("  from-path  ")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert auth.find_token().value == "from-path"

    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    token = auth.find_token()
    assert token.value == "from-env" and token.source == "RAY_AUTH_TOKEN"
    assert token.headers() == {"Authorization": "Bearer from-env"}
    assert "from-env" not in repr(token), "the token never shows in reprs (logs, tracebacks)"


def test_unreadable_token_file_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("would-be-fallback")
    _clear_tokens(monkeypatch, home)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH=.*cannot read"):
        auth.find_token()
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "empty"))
    with pytest.raises(ClusterError, match="empty"):
        auth.find_token()


@pytest.mark.parametrize("address, loopback", [
    ("http://127.0.0.1:8265", True), ("127.0.0.1:8265", True), ("http://localhost:8265", True),
    ("http://[::1]:8265", True), ("https://127.5.0.1", True),
    ("http://0.0.0.0:8265", False), ("http://10.0.0.5:8265", False), ("http://head.example.com:8265", False),
    ("http://127.0.0.1.example.com:8265", False), ("http://[fd00::2]:8265", False),
])
def test_loopback_addresses(address, loopback):
    assert auth.is_loopback(auth.normalize_address(address)) is loopback


def test_only_dashboard_urls_are_accepted():
    assert auth.normalize_address(" head:8265/ ") == "http://head:8265"
    with pytest.raises(ClusterError, match="Ray Client"):
        auth.normalize_address("ray://head:10001")
    with pytest.raises(ClusterError, match="empty"):
        auth.normalize_address("  ")


def _non_loopback_ip() -> str:
    """This machine's address on a real interface (the kernel picks it; nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.255", 9))
            ip = s.getsockname()[0]
        except OSError:
            ip = "0.0.0.0"
    return ip if not ip.startswith("127.") else "0.0.0.0"


class _Listener:
    """A TCP server that records what connects to it and answers 404 (it is not Ray)."""

    def __init__(self, ip: str):
        self.sock = socket.socket()
        self.sock.bind((ip, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    self.requests.append(conn.recv(65536))
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_non_loopback_without_token_is_refused_before_any_connection(tmp_path):
    ip = _non_loopback_ip()
    listener = _Listener(ip)
    try:
        home, bin_dir = tmp_path / "home", tmp_path / "bin"
        home.mkdir()
        write_shim(bin_dir)
        env = client_env(home, bin_dir)  # no token anywhere: no env, empty HOME
        cfg = pipeline_config(tmp_path / "p.yaml", "p", str(tmp_path / "runs"), str(tmp_path / "*.jsonl"))
        address = f"http://{ip}:{listener.port}"

        refused = run_seedline(bin_dir, ("submit", str(cfg), "--address", address), env)
        assert refused.returncode == 2, refused.stderr
        assert "refusing to submit" in refused.stderr and "--insecure" in refused.stderr
        assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        assert listener.requests == [], "nothing may reach the cluster before the check"
        assert not (tmp_path / "runs").exists(), "nothing is written either"

        insecure = run_seedline(bin_dir, ("submit", str(cfg), "--address", address, "--insecure"), env)
        assert "warning: --insecure" in insecure.stderr
        assert listener.requests, "with --insecure the submission goes ahead"
        assert b"authorization" not in listener.requests[0].lower()
        # The listener is not Ray: the command fails with one clear line, not a traceback.
        assert insecure.returncode == 1, insecure.stderr
        assert "Traceback" not in insecure.stderr and "error: the Ray job API" in insecure.stderr
    finally:
        listener.close()
