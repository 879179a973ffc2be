"""A node-local directory for what training workers fetch from (or stage for) an object-store workdir.

One directory per node, shared by every process on it (``SEEDLINE_NODE_CACHE``; default
``<Ray temp dir>/seedline-cache``, i.e. ``/tmp/ray/seedline-cache``), holding:

- ``shards/``: tokenized shards, content-addressed by sha256 and size-bounded (``stages/lm/shard_cache.py``);
- ``work/``: per-run staging of checkpoints and metrics before upload (``stages/lm/ckpt_store.py``);
- ``universal/``: a checkpoint converted for another worker count while it loads (``stages/lm/reshard.py``).

Processes on one node coordinate with ``flock`` on files under ``locks/`` (released by the kernel when a
process dies, so a killed rank never leaves a stale lock). ``IO`` counts the bytes this process moved to and
from the object store; the trainer sums them over ranks for the stage's stats.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "SEEDLINE_NODE_CACHE"
IO = {"bytes_downloaded": 0, "bytes_uploaded": 0, "cache_hits": 0}


def _ray_temp_dir() -> Path:
    try:  # inside a Ray worker or driver: the node's temp dir (--temp-dir of `ray start`)
        import ray._private.worker as rw

        node = rw._global_node
        if node is not None:
            return Path(node.get_temp_dir_path())
    except (ImportError, AttributeError):
        pass
    return Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray"


def cache_root() -> Path:
    """This node's cache directory (created on first use)."""
    root = Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else _ray_temp_dir() / "seedline-cache"
    root.mkdir(parents=True, exist_ok=True)
    return root


def key_of(text: str) -> str:
    """A short, filesystem-safe name for a URL (a run or stage directory)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


@contextlib.contextmanager
def node_lock(name: str) -> Iterator[None]:
    """An exclusive lock held by one process of this node at a time (``flock``: dies with its holder)."""
    locks = cache_root() / "locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{name}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def reset_io() -> None:
    for k in IO:
        IO[k] = 0
