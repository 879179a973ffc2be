"""Training checkpoints: ``<out>/checkpoints/step-<N>/`` written by DeepSpeed on every rank, plus the
trainer's own state, and a completion marker written last.

A checkpoint directory holds DeepSpeed's files (model states, each rank's ZeRO optimizer partition, the
lr scheduler), the client state (step, consumed samples, tokens, loader state) in DeepSpeed's model-state
file, one ``rng-rank<r>.pt`` per rank (python, numpy, torch and CUDA generators) and, last,
``complete.json``. Only directories with the marker count; the newest one wins.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARKER = "complete.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dirs(root: str | Path) -> list[tuple[int, Path, bool]]:
    """``(step, path, complete)`` of every ``step-N`` directory under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p, (p / MARKER).is_file()))
    return sorted(out)


def newest_complete(root: str | Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint as ``(step, path)``, or None."""
    done = [(s, p) for s, p, ok in step_dirs(root) if ok]
    return done[-1] if done else None


def remove_incomplete(root: str | Path) -> None:
    """Delete checkpoint directories a crash left without a marker (rank 0 only, before training)."""
    for _, p, ok in step_dirs(root):
        if not ok:
            shutil.rmtree(p, ignore_errors=True)


def prune(root: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; delete older ones (rank 0 only)."""
    done = [p for _, p, ok in step_dirs(root) if ok]
    for p in done[:-keep]:
        (p / MARKER).unlink()  # no longer counted even if the removal is interrupted
        shutil.rmtree(p, ignore_errors=True)


def write_marker(path: Path, info: dict[str, Any]) -> None:
    """Atomically write the completion marker (after every rank has saved)."""
    tmp = path / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(info, sort_keys=True))
    os.replace(tmp, path / MARKER)


def read_marker(path: Path) -> dict[str, Any]:
    return json.loads((path / MARKER).read_text())


def rng_state() -> dict[str, Any]:
    """Every random generator the training loop may touch."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(path: Path, rank: int) -> None:
    tmp = path / f".rng-rank{rank}.pt.tmp"
    torch.save(rng_state(), tmp)
    os.replace(tmp, path / f"rng-rank{rank}.pt")


def load_rng(path: Path, rank: int) -> None:
    f = path / f"rng-rank{rank}.pt"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: checkpoint has no RNG state for rank {rank}")
    set_rng_state(torch.load(f, weights_only=False))
