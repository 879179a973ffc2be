"""Tokenized shards of an object-store workdir, fetched once per node into a size-bounded LRU cache.

A shard is stored as ``<cache>/shards/<sha256>.arrow`` (content-addressed: the same shard of two runs is
fetched once; a replaced shard can never be served stale). ``fetch`` downloads under a per-shard node lock
(concurrent ranks of one node wait for the first one's download and then share the file), verifies the
byte count and sha256 against the tokenize manifest, and renames the file into place atomically. The
shard is then opened by the caller under the same lock, so a concurrent eviction cannot remove it between
fetch and memory-map (a mapped file that is unlinked later stays readable until it is unmapped).

The cache holds at most ``SEEDLINE_SHARD_CACHE_GB`` GiB (default 32); beyond that the least recently
used shards (by modification time, refreshed on every hit) are deleted, never the one just fetched.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from stages.lm.node_cache import IO, cache_root, node_lock

LIMIT_ENV = "SEEDLINE_SHARD_CACHE_GB"
T = TypeVar("T")


def limit_bytes() -> int:
    return int(float(os.environ.get(LIMIT_ENV) or 32) * 2**30)


def _shards_dir() -> Path:
    d = cache_root() / "shards"
    d.mkdir(exist_ok=True)
    return d


def _download(url: str, dest: Path, want_bytes: int, want_sha: str) -> None:
    """``url`` to ``dest`` through a temporary name, verified against the manifest's size and hash."""
    from pipeline import storage

    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    h, n = hashlib.sha256(), 0
    try:
        with storage.open_read(url) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 22):
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
        IO["bytes_downloaded"] += n
        if n != want_bytes:
            raise ValueError(f"{url}: {n} bytes, the tokenize manifest says {want_bytes} (truncated or "
                             "replaced shard)")
        if h.hexdigest() != want_sha:
            raise ValueError(f"{url}: sha256 differs from the tokenize manifest (corrupt or replaced shard)")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def fetch(url: str, sha256: str, nbytes: int, open_fn: Callable[[Path], T]) -> T:
    """``open_fn(local path)`` of the shard at ``url``, downloading and verifying it first unless this
    node already has it (see the module docstring)."""
    if not sha256:
        raise ValueError(f"{url}: the tokenize manifest has no sha256 for this shard; re-run tokenize")
    dest = _shards_dir() / f"{sha256}.arrow"
    with node_lock(f"shard-{sha256}"):
        if dest.is_file() and dest.stat().st_size == nbytes:
            IO["cache_hits"] += 1
            os.utime(dest)  # most recently used
        else:
            _download(url, dest, nbytes, sha256)
        opened = open_fn(dest)
    evict(keep=dest)
    return opened


def evict(keep: Path | None = None, limit: int | None = None) -> list[str]:
    """Delete least recently used shards until the cache fits ``limit`` bytes; returns what went."""
    limit = limit_bytes() if limit is None else limit
    gone: list[str] = []
    with node_lock("shard-evict"):
        files: list[tuple[float, int, Path]] = []
        for p in _shards_dir().glob("*.arrow"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(s for _, s, _ in files)
        for _, size, p in sorted(files, key=lambda t: t[0]):
            if total <= limit:
                break
            if keep is not None and p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            gone.append(p.name)
    return gone


def cached(sha256: str) -> Path | None:
    """The cached file of a shard, if this node has it."""
    p = _shards_dir() / f"{sha256}.arrow"
    return p if p.is_file() else None


def remote_manifest(url: str) -> dict[str, Any]:
    from pipeline import storage

    return storage.read_json(storage.join(url, "manifest.json"))
