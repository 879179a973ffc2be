"""Paths that may be local directories or fsspec URLs (``s3://bucket/prefix``).

Every stage reads and writes its run directory through these helpers so that the same code works on a
laptop and on shared cluster storage. Writes are atomic: a local file is written to a temporary name in
the same directory and renamed; a remote object is uploaded whole (object stores never expose a partial
object), from a local temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def is_url(path: str) -> bool:
    """True for ``scheme://...`` paths other than ``file://``."""
    return "://" in path and not path.startswith("file://")


def _strip_file(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def fs_for(path: str):
    """The fsspec filesystem and the path inside it."""
    import fsspec

    fs, inner = fsspec.core.url_to_fs(path, **_storage_options(path))
    return fs, inner


def _storage_options(path: str) -> dict[str, Any]:
    # An S3-compatible endpoint other than AWS (MinIO, moto, Ceph) is given the way the AWS CLI takes it.
    if path.startswith("s3://"):
        # Another process (a worker, a second driver) writes markers and leases here: a cached listing
        # would hide them, so listings are always fresh.
        opts: dict[str, Any] = {"use_listings_cache": False}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` (works for URLs and local paths)."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def resolve(path: str) -> str:
    """Absolute local path, or the URL unchanged."""
    if is_url(path):
        return path.rstrip("/")
    return str(Path(_strip_file(path)).expanduser().resolve())


def local(path: str) -> Path | None:
    """The local ``Path`` for a local path, None for a remote URL."""
    return None if is_url(path) else Path(_strip_file(path))


def exists(path: str) -> bool:
    p = local(path)
    if p is not None:
        return p.exists()
    fs, inner = fs_for(path)
    return fs.exists(inner)


def makedirs(path: str) -> None:
    p = local(path)
    if p is not None:
        p.mkdir(parents=True, exist_ok=True)
    # Object stores have no directories: nothing to create.


def read_bytes(path: str) -> bytes:
    p = local(path)
    if p is not None:
        return p.read_bytes()
    fs, inner = fs_for(path)
    with fs.open(inner, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def read_json_or(path: str, default: Any) -> Any:
    """``read_json`` or ``default`` when the file does not exist."""
    try:
        return read_json(path)
    except FileNotFoundError:
        return default


def _read_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it, which
    would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()  # what open() gives a new file: world-readable under umask 022


@contextlib.contextmanager
def atomic_local_file(path: str) -> Iterator[Path]:
    """Yield a temporary local path; on success it becomes ``path`` in one step, with the mode a newly
    created file gets (``FILE_MODE``), whatever mode the writer gave the temporary file (safetensors
    and ``tempfile`` create theirs 0600)."""
    p = local(path)
    if p is not None:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            yield tmp
            if tmp.exists():
                os.chmod(tmp, FILE_MODE)
            os.replace(tmp, p)
        finally:
            if tmp.exists():
                tmp.unlink()
        return
    with tempfile.TemporaryDirectory(prefix="seedline-up-") as d:
        tmp = Path(d) / "object"
        yield tmp
        fs, inner = fs_for(path)
        fs.put_file(str(tmp), inner)


@contextlib.contextmanager
def open_atomic(path: str, mode: str = "wb") -> Iterator[IO]:
    """Open ``path`` for writing; readers see either the old file or the whole new one."""
    with atomic_local_file(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_bytes(path: str, data: bytes) -> None:
    with open_atomic(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def touch_marker(path: str, content: str = "") -> None:
    """Completion markers are written last, after the data they vouch for."""
    write_text(path, content)


def listdir(path: str) -> list[str]:
    """Names (not paths) directly under ``path``; empty if it does not exist."""
    p = local(path)
    if p is not None:
        return sorted(os.listdir(p)) if p.is_dir() else []
    fs, inner = fs_for(path)
    if not fs.exists(inner):
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(inner, detail=False))


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob; URLs keep their scheme."""
    if not is_url(pattern):
        import glob as _glob

        return sorted(_glob.glob(_strip_file(pattern), recursive=True))
    fs, inner = fs_for(pattern)
    proto = pattern.split("://", 1)[0]
    return sorted(f"{proto}://{m}" for m in fs.glob(inner))


def remove(path: str, recursive: bool = False) -> None:
    """Delete a file or (with ``recursive``) a directory; missing paths are fine."""
    p = local(path)
    if p is not None:
        if p.is_dir():
            if not recursive:
                raise IsADirectoryError(path)
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        return
    fs, inner = fs_for(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=recursive)


def open_read(path: str, mode: str = "rb") -> IO:
    """Open a local file or remote object for reading."""
    p = local(path)
    if p is not None:
        return open(p, mode)
    fs, inner = fs_for(path)
    return fs.open(inner, mode)


def size(path: str) -> int:
    p = local(path)
    if p is not None:
        return p.stat().st_size
    fs, inner = fs_for(path)
    return int(fs.size(inner))


def upload_dir(local_dir: Path, dest: str) -> None:
    """Copy a local directory tree to ``dest`` (a no-op when ``dest`` is that directory)."""
    p = local(dest)
    if p is not None:
        if p.resolve() != local_dir.resolve():
            shutil.copytree(local_dir, p, dirs_exist_ok=True)
        return
    fs, inner = fs_for(dest)
    fs.put(str(local_dir) + "/", inner, recursive=True)


def download_dir(src: str, local_dir: Path) -> Path:
    """Make ``src`` available as a local directory (itself when already local)."""
    p = local(src)
    if p is not None:
        return p
    fs, inner = fs_for(src)
    local_dir.mkdir(parents=True, exist_ok=True)
    fs.get(inner.rstrip("/") + "/", str(local_dir) + "/", recursive=True)
    return local_dir
