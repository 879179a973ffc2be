"""A real 3-node Ray cluster on this machine (head + 2 workers, each its own ``ray start`` process group
with 1 CPU and a custom resource), a moto S3 endpoint and an MLflow server, one per test session
(``cluster.local_cluster``; ``make cluster-up`` starts the same for users). Tests here are marked
``multinode`` (and ``slow``): ``pytest -m multinode`` selects them, ``-m 'not multinode'`` leaves them out."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from multinode_helpers import SEEDLINE

from cluster import local_cluster
from cluster.local_cluster import LocalCluster


def pytest_collection_modifyitems(items):
    """Marks the tests here, and runs them last: the cluster (a session fixture) then lives only while they
    run, not beside the rest of the suite on the same cores."""
    here = Path(__file__).parent
    ours = [item for item in items if here in Path(str(item.fspath)).parents]
    for item in ours:
        item.add_marker(pytest.mark.multinode)
        item.add_marker(pytest.mark.slow)
    chosen = set(map(id, ours))
    items[:] = [item for item in items if id(item) not in chosen] + ours


@pytest.fixture(scope="session")
def cluster3(tmp_path_factory) -> LocalCluster:
    c = local_cluster.start(tmp_path_factory.mktemp("cluster3"))
    saved = dict(os.environ)
    # This process reads the runs on S3 too (pipeline.storage); the client settings are the user's.
    os.environ.update({k: v for k, v in c.env().items() if k.startswith("AWS_")})
    try:
        yield c
    finally:
        os.environ.clear()
        os.environ.update(saved)
        c.stop()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo-data"
    subprocess.run([SEEDLINE, "example-data", str(out)], check=True, capture_output=True, timeout=300)
    return out


