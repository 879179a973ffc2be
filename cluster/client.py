"""A ``JobSubmissionClient`` that always carries the token and turns Ray's errors into one clear line."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

from cluster.auth import Token, find_token, normalize_address
from cluster.errors import ClusterError

ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"  # what `ray job` reads too


def default_address(address: str | None) -> str:
    """``address`` or ``$RAY_API_SERVER_ADDRESS``; a usage error when neither is given."""
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise ClusterError(f"no cluster address: pass --address http://HEAD:8265 or set {ADDRESS_ENV}",
                           exit_code=2)
    return normalize_address(address)


def connect(address: str, token: Token | None = None) -> Any:
    """A client for the job API at ``address``, with ``token`` (default: ``find_token()``) on every
    request. Construction contacts the cluster, so call it only after the safety checks."""
    from ray.job_submission import JobSubmissionClient

    token = token if token is not None else find_token()
    headers = token.headers() if token else {}
    with translate_errors(address):
        return JobSubmissionClient(address, headers=headers)


@contextlib.contextmanager
def translate_errors(address: str, job_id: str | None = None) -> Iterator[None]:
    """Ray's connection, authentication and not-found errors as ``ClusterError`` lines."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "authentication failed"
        raise ClusterError(
            f"the Ray cluster at {address} refused the request ({first}); set RAY_AUTH_TOKEN or "
            "RAY_AUTH_TOKEN_PATH to the cluster's token", exit_code=2) from None
    except ConnectionError:
        raise ClusterError(
            f"cannot reach the Ray job API at {address}: is the cluster up, and is this its dashboard "
            "address (default port 8265)?") from None
    except RuntimeError as e:
        text = str(e)
        if job_id and ("does not exist" in text or "status code 404" in text):
            raise ClusterError(f"no job '{job_id}' on {address}; `seedline jobs` lists them",
                               exit_code=2) from None
        raise ClusterError(f"the Ray job API at {address} failed: {_one_line(text)}") from None


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()[:500]
