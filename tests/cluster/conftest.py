"""A real Ray head for the cluster tests (see ``cluster_helpers.start_ray_head``), one per session."""

from __future__ import annotations

import pytest
from cluster_helpers import RayHead, start_ray_head


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory) -> RayHead:
    with start_ray_head(tmp_path_factory.mktemp("rayhead")) as head:
        yield head
