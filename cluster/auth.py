"""Ray token authentication and address safety.

A Ray cluster runs whatever code reaches its job API (ShadowRay, CVE-2023-48022), so Seedline sends the
cluster's token with every request and refuses to submit to a non-loopback address without one unless
the user says ``--insecure``. The token is looked up where Ray looks: ``RAY_AUTH_TOKEN``, then the file
named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``. Its value is never printed.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cluster.errors import ClusterError

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


@dataclass(frozen=True)
class Token:
    """A Ray auth token and where it came from (the value stays out of reprs and logs)."""

    value: str = field(repr=False)
    source: str

    def headers(self) -> dict[str, str]:
        """The HTTP header Ray's dashboard checks."""
        return {"Authorization": f"Bearer {self.value}"}


def default_token_path() -> Path:
    return Path(os.path.expanduser("~")) / ".ray" / "auth_token"


def find_token() -> Token | None:
    """The token Ray itself would use, or None. A named token file that cannot be read is an error,
    as it is for Ray (a silent fall back to another token would hide the misconfiguration)."""
    value = os.environ.get(TOKEN_ENV, "").strip()
    if value:
        return Token(value, TOKEN_ENV)
    named = os.environ.get(TOKEN_PATH_ENV, "").strip()
    if named:
        path = Path(named).expanduser()
        try:
            text = path.read_text().strip()
        except OSError as e:
            raise ClusterError(f"{TOKEN_PATH_ENV}={named}: cannot read the token file ({e.strerror})",
                               exit_code=2) from None
        if not text:
            raise ClusterError(f"{TOKEN_PATH_ENV}={named}: the token file is empty", exit_code=2)
        return Token(text, f"{TOKEN_PATH_ENV} ({path})")
    path = default_token_path()
    if path.is_file():
        text = path.read_text().strip()
        if text:
            return Token(text, str(path))
    return None


def normalize_address(address: str) -> str:
    """``HEAD:8265`` -> ``http://HEAD:8265``; only the dashboard's http(s) job API is accepted."""
    address = address.strip().rstrip("/")
    if not address:
        raise ClusterError("the Ray address is empty; pass --address http://HEAD:8265", exit_code=2)
    if "://" not in address:
        address = f"http://{address}"
    scheme = address.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ClusterError(
            f"{address}: use the Ray dashboard URL, e.g. http://HEAD:8265 (jobs go through the dashboard's "
            "job API; ray:// is the Ray Client, which is not meant for training jobs)", exit_code=2)
    try:
        host = urlsplit(address).hostname
    except ValueError as e:
        raise ClusterError(f"{address}: not a valid URL ({e})", exit_code=2) from None
    if not host:
        raise ClusterError(f"{address}: no host in the address", exit_code=2)
    return address


def host_of(address: str) -> str:
    return urlsplit(address).hostname or ""


def is_loopback(address: str) -> bool:
    """True when ``address`` names this machine through the loopback interface only.

    ``localhost`` and ``*.localhost`` count only when every address they resolve to is a loopback one (a
    resolver may map ``*.localhost`` anywhere); other names are not trusted; ``0.0.0.0`` is not loopback
    (it means every interface).
    """
    host = host_of(address).lower()
    if host == "localhost" or host.endswith(".localhost"):
        return _resolves_to_loopback(host)
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _resolves_to_loopback(host: str) -> bool:
    import socket

    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    addrs = {info[4][0].split("%")[0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)


def check_submission(address: str, token: Token | None, insecure: bool) -> list[str]:
    """Refuse an unauthenticated submission to another machine; return warnings to show the user.

    Runs before any connection is made, so an unsafe submission never reaches the network.
    """
    warnings: list[str] = []
    loopback = is_loopback(address)
    if token is None and not loopback:
        if not insecure:
            raise ClusterError(
                f"refusing to submit to {address} without a Ray auth token: a Ray cluster without token "
                "auth runs any code anyone sends it (CVE-2023-48022, 'ShadowRay'). Set RAY_AUTH_TOKEN (or "
                "RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the cluster's token, or pass --insecure if "
                "this cluster is on a network you trust", exit_code=2)
        warnings.append(
            f"--insecure: submitting to {address} without a Ray auth token; anyone who can reach this "
            "address can run code on the cluster")
    if token is not None and not loopback and address.lower().startswith("http://"):
        warnings.append(
            f"the Ray auth token travels unencrypted over http to {host_of(address)}; prefer https, or a "
            "tunnel to 127.0.0.1 (kubectl port-forward, `ray dashboard`)")
    return warnings
