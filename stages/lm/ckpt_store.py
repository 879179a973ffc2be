"""Where a training stage's checkpoints, metrics and model live: its own directory when that is a local
(or shared) path, else an object store reached through node-local staging.

Local stage directory (the layout is unchanged): DeepSpeed writes ``<out>/checkpoints/step-N/`` in place,
metrics and the model are written in place, nothing is copied.

Object-store stage directory (``s3://...``, any fsspec URL):

- every rank saves its DeepSpeed files into a node-local directory of its own
  (``<node cache>/work/<run key>/rank-<r>/checkpoints/step-N/``), uploads them to
  ``<out>/checkpoints/step-N/`` and deletes the local copy; rank 0 writes ``complete.json`` only after a
  barrier that follows every rank's upload, so a marker always vouches for every rank's files;
- resume lists ``<out>/checkpoints``, deletes step directories without a marker (rank 0) and downloads
  the newest complete one once per node (under a node lock) into ``<...>/restore/step-N/``;
- rank 0 keeps ``metrics.jsonl`` / ``perf.jsonl`` locally (``<...>/out/``) and uploads them before each
  marker (resume downloads and truncates them to the checkpoint's step, as on a local path); the exported
  ``model/`` is written locally and uploaded the same way.

Bytes moved are counted in ``stages.lm.node_cache.IO``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline import storage
from stages.lm import checkpoint as ckpt
from stages.lm.node_cache import IO, cache_root, key_of, node_lock

METRIC_FILES = ("metrics.jsonl", "perf.jsonl")


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def upload_tree(local_dir: Path, dest: str) -> int:
    """Upload every file under ``local_dir`` to ``dest`` (same relative paths); returns the bytes."""
    fs, inner = storage.fs_for(dest)
    n = 0
    for p in sorted(local_dir.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{inner.rstrip('/')}/{p.relative_to(local_dir).as_posix()}")
            n += p.stat().st_size
    IO["bytes_uploaded"] += n
    return n


def download_tree(src: str, local_dir: Path) -> int:
    """Download every object under ``src`` into ``local_dir``; returns the bytes."""
    fs, inner = storage.fs_for(src)
    inner = inner.rstrip("/")
    n = 0
    for key in sorted(fs.find(inner)):
        rel = key[len(inner) + 1:]
        dest = local_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(key, str(dest))
        n += dest.stat().st_size
    IO["bytes_downloaded"] += n
    return n


class CheckpointStore:
    """The checkpoint root of one training stage as seen by one rank (see the module docstring)."""

    def __init__(self, out: str, rank: int, local_rank: int = 0):
        self.out = out
        self.rank, self.local_rank = rank, local_rank
        self.remote = out if storage.is_url(out) else None
        if self.remote is None:
            self.local_out = Path(out)
            self.save_root = self.local_out / "checkpoints"
            self.work = None
        else:
            self.work = cache_root() / "work" / key_of(out)
            self.local_out = self.work / "out"
            self.save_root = self.work / f"rank-{rank}" / "checkpoints"
            shutil.rmtree(self.save_root, ignore_errors=True)  # a killed attempt's leftovers
            self.save_root.mkdir(parents=True, exist_ok=True)
        self.local_out.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """``<out>/checkpoints`` (a local path or a URL)."""
        return storage.join(self.out, "checkpoints")

    # -- listing -------------------------------------------------------------------------------------------
    def steps(self) -> list[tuple[int, str, bool]]:
        """``(step, name, complete)`` of every ``step-N`` directory, oldest first."""
        if self.remote is None:
            return [(s, p.name, ok) for s, p, ok in ckpt.step_dirs(self.save_root)]
        out = []
        for name in storage.listdir(self.url):
            m = ckpt.STEP_DIR.match(name)
            if m:
                out.append((int(m.group(1)), name, storage.exists(storage.join(self.url, name, ckpt.MARKER))))
        return sorted(out)

    def remove_incomplete(self) -> None:
        """Delete step directories a crash left without a marker (rank 0, before training)."""
        if self.remote is None:
            ckpt.remove_incomplete(self.save_root)
            return
        for _, name, ok in self.steps():
            if not ok:
                storage.remove(storage.join(self.url, name), recursive=True)

    def newest(self) -> tuple[int, str, dict[str, Any]] | None:
        """``(step, name, marker)`` of the newest complete checkpoint, or None."""
        done = [(s, n) for s, n, ok in self.steps() if ok]
        if not done:
            return None
        step, name = done[-1]
        return step, name, storage.read_json(storage.join(self.url, name, ckpt.MARKER))

    # -- save ----------------------------------------------------------------------------------------------
    def tag_dir(self, tag: str) -> Path:
        """Where this rank writes checkpoint ``tag`` locally."""
        d = self.save_root / tag
        d.mkdir(parents=True, exist_ok=True)
        return d

    def publish(self, tag: str) -> None:
        """After this rank saved ``tag`` locally: upload its files and drop the local copy (object store)."""
        if self.remote is None:
            return
        upload_tree(self.save_root / tag, storage.join(self.url, tag))
        shutil.rmtree(self.save_root / tag, ignore_errors=True)

    def upload_metrics(self) -> None:
        """Rank 0: the metric files as they are now (before a marker, so they cover its step)."""
        if self.remote is None:
            return
        for name in METRIC_FILES:
            p = self.local_out / name
            if p.is_file():
                with storage.atomic_local_file(storage.join(self.out, name)) as tmp:
                    shutil.copyfile(p, tmp)
                IO["bytes_uploaded"] += p.stat().st_size

    def mark(self, tag: str, info: dict[str, Any]) -> None:
        """Rank 0, after every rank's files are in place: the completion marker, written last."""
        if self.remote is None:
            ckpt.write_marker(self.save_root / tag, info)
        else:
            storage.write_json(storage.join(self.url, tag, ckpt.MARKER), info)

    def prune(self, keep: int) -> None:
        """Rank 0: keep the newest ``keep`` complete checkpoints (the marker goes first)."""
        if self.remote is None:
            ckpt.prune(self.save_root, keep)
            return
        done = [n for _, n, ok in self.steps() if ok]
        for name in done[:-keep]:
            storage.remove(storage.join(self.url, name, ckpt.MARKER))
            storage.remove(storage.join(self.url, name), recursive=True)

    # -- resume --------------------------------------------------------------------------------------------
    def fetch(self, name: str) -> Path:
        """A local directory holding ``<name>/`` (the checkpoint root to give DeepSpeed's loader)."""
        if self.remote is None:
            return self.save_root
        root = self.work / "restore"
        with node_lock(f"restore-{key_of(self.out)}"):
            done = root / name / ".downloaded"
            if not done.is_file():
                shutil.rmtree(root, ignore_errors=True)
                download_tree(storage.join(self.url, name), root / name)
                done.write_text("")
        return root

    def release(self) -> None:
        """Drop this node's restore copy (local rank 0, after every rank loaded it)."""
        if self.remote is not None and self.local_rank == 0:
            with node_lock(f"restore-{key_of(self.out)}"):
                shutil.rmtree(self.work / "restore", ignore_errors=True)

    def fetch_metrics(self) -> None:
        """Rank 0 on resume: the uploaded metric files replace any local leftovers."""
        if self.remote is None:
            return
        for name in METRIC_FILES:
            local = self.local_out / name
            local.unlink(missing_ok=True)
            try:
                data = storage.read_bytes(storage.join(self.out, name))
            except FileNotFoundError:
                continue
            IO["bytes_downloaded"] += len(data)
            local.write_bytes(data)

    def put_model(self, local_model: Path) -> None:
        """Upload an exported model directory to ``<out>/model`` (object store)."""
        self.put_dir(local_model, "model")

    def put_dir(self, local_dir: Path, name: str) -> None:
        """Upload a directory written in ``local_out`` to ``<out>/<name>`` (object store; local: nothing)."""
        if self.remote is not None:
            storage.remove(storage.join(self.out, name), recursive=True)
            upload_tree(local_dir, storage.join(self.out, name))
            shutil.rmtree(local_dir, ignore_errors=True)
