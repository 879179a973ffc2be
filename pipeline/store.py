"""The store shared by every run of a workdir: ``<workdir>/store/<type>-<fingerprint>/``.

A run's ``run.json`` records the entries it uses; ``seedline gc`` removes the entries no run refers to
(never one that a live driver is writing).
"""

from __future__ import annotations

from pipeline import storage
from pipeline.state import STORE, entry_dir, lease_alive, read_lease


def entries(workdir: str) -> list[str]:
    """Every store entry directory, sorted."""
    root = storage.join(workdir, STORE)
    if not storage.exists(root):
        return []
    return sorted(storage.join(root, name) for name in storage.listdir(root))


def run_dirs(workdir: str) -> list[str]:
    """Every run directory of the workdir (a sub-directory with a ``run.json``)."""
    return sorted(p.rsplit("/", 1)[0] for p in storage.glob(storage.join(workdir, "*", "run.json")))


def referenced(workdir: str) -> dict[str, list[str]]:
    """``{entry directory: [run directories that use it]}``."""
    out: dict[str, list[str]] = {}
    for run_dir in run_dirs(workdir):
        stages = storage.read_json_or(storage.join(run_dir, "run.json"), {}).get("stages") or {}
        for entry in stages.values():
            out.setdefault(entry_dir(run_dir, entry).rstrip("/"), []).append(run_dir)
    return out


def unreferenced(workdir: str) -> list[str]:
    """Store entries no run refers to and no live driver holds."""
    used = referenced(workdir)
    return [e for e in entries(workdir) if e.rstrip("/") not in used and not lease_alive(read_lease(e))]


def collect(workdir: str, dry_run: bool = False) -> list[str]:
    """Remove (or, dry, only list) the unreferenced entries; returns them."""
    doomed = unreferenced(workdir)
    if not dry_run:
        for e in doomed:
            storage.remove(e, recursive=True)
    return doomed
