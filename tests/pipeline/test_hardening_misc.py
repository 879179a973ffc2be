"""The smaller points of issue 22: ``*.localhost`` names are loopback only when they resolve there,
``resume --address`` refusals exit 2 like ``submit``'s, and the redaction rule itself."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import auth
from pipeline.redact import holds_mask, is_secret_key, redact_obj, redact_text

ROOT = Path(__file__).resolve().parents[2]


def test_localhost_subdomain_that_resolves_elsewhere_is_not_loopback(monkeypatch):
    real = socket.getaddrinfo

    def resolver(host, *args, **kwargs):  # a resolver (or /etc/hosts) mapping the name to another machine
        if host == "evil.localhost":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("203.0.113.7", 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    assert auth.is_loopback("http://evil.localhost:8265") is False
    assert auth.is_loopback("http://localhost:8265") is True


def test_unresolvable_localhost_subdomain_is_not_loopback():
    name = "no-such-name-for-seedline.localhost"
    try:
        socket.getaddrinfo(name, None)
    except OSError:
        assert auth.is_loopback(f"http://{name}:8265") is False
    else:  # a resolver that maps *.localhost (systemd-resolved does, to loopback): then it counts
        assert auth.is_loopback(f"http://{name}:8265") is all(
            i[4][0] in ("127.0.0.1", "::1") for i in socket.getaddrinfo(name, None))


def test_resume_address_refusal_exits_2_like_submit(tmp_path):
    run_dir = tmp_path / "runs" / "p"
    run_dir.mkdir(parents=True)
    config = {"name": "p", "workdir": str(tmp_path / "runs")}
    (run_dir / "run.json").write_text(json.dumps({"config": config}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path))  # no ~/.ray/auth_token
    res = subprocess.run([sys.executable, "-m", "pipeline", "resume", str(run_dir), "--address",
                          "http://203.0.113.7:8265"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "refusing" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("key, secret", [
    ("password", True), ("hf_token", True), ("AWS_SECRET_ACCESS_KEY", True), ("apiKey", True),
    ("stages.x.db_passwd", True), ("private_key", True),
    ("tokenizer", False), ("max_new_tokens", False), ("trained_tokens", False), ("author", False),
    ("input", False), ("sample_docs", False),
])
def test_secret_keys(key, secret):
    assert is_secret_key(key) is secret


def test_redaction_rule():
    assert redact_text("s3://u:p@bucket/x and https://ghp_x@github.com/y") == \
        "s3://***:***@bucket/x and https://***@github.com/y"
    assert redact_text("s3://bucket/path@v2/x") == "s3://bucket/path@v2/x"  # '@' after the host: no user-info
    assert redact_text("https://h/o?X-Amz-Signature=abc&part=2") == "https://h/o?X-Amz-Signature=***&part=2"
    assert redact_text('{"api_key": "k-1", "n": 5} token=zz') == '{"api_key": "***", "n": 5} token=***'
    plain = "stages.tokenize.seq_len: must be > 0, got -1"
    assert redact_text(plain) == plain
    data = {"tokenizer": {"path": "t.json"}, "db": {"password": "x", "url": "mysql://a:b@h/db"},
            "token": None}
    assert redact_obj(data) == {"tokenizer": {"path": "t.json"},
                                "db": {"password": "***", "url": "mysql://***:***@h/db"}, "token": None}
    assert holds_mask(redact_obj(data)) == "db.password"
    assert holds_mask({"stages": {"a": {"n": 1}}}) is None


def test_a_secret_seen_once_is_masked_wherever_it_appears_later():
    redact_obj({"api_token": "tok-7f3a9c1e", "source": "https://bob:hunter2-long@h/x"})
    # a worker printing the bare values to a log: no key, no URL around them
    assert redact_text("using tok-7f3a9c1e and hunter2-long now") == "using *** and *** now"
    assert redact_text("a short one: x") == "a short one: x"
