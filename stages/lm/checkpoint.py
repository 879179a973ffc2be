"""Training checkpoints: ``<out>/checkpoints/step-<N>/`` written by DeepSpeed on every rank, plus the
trainer's own state, and a completion marker written last.

A checkpoint directory holds DeepSpeed's files (model states, each rank's ZeRO optimizer partition, the
lr scheduler), Seedline's own state in formats that cannot run code: ``trainer-state.json`` (step, consumed
samples, tokens, loader state; rank 0) and one ``rng-rank<r>.json`` per rank (python, numpy, torch and CUDA
generators), and, last, ``complete.json``. Only directories with the marker count; the newest one wins.
DeepSpeed's ``.pt`` files are read through ``stages.lm.safe_load`` (no arbitrary pickles).
"""

from __future__ import annotations

import base64
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
STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dirs(root: str | Path) -> list[tuple[int, Path, bool]]:
    """``(step, path, complete)`` of every ``step-N`` directory under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
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


TRAINER_STATE = "trainer-state.json"


def _tensor_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _b64_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Every random generator the training loop may touch, as JSON-able values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _tensor_b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_b64_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_b64_tensor(s) for s in state["cuda"]])


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True))
    os.replace(tmp, path)


def save_rng(path: Path, rank: int) -> None:
    _write_json(path / f"rng-rank{rank}.json", rng_state())


def load_rng(path: Path, rank: int) -> None:
    f = path / f"rng-rank{rank}.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: checkpoint has no RNG state for rank {rank}")
    set_rng_state(json.loads(f.read_text()))


def save_trainer_state(path: Path, state: dict[str, Any]) -> None:
    """Rank 0: step, tokens, consumed samples and the loader's position (JSON)."""
    _write_json(path / TRAINER_STATE, state)


def load_trainer_state(path: Path) -> dict[str, Any]:
    f = path / TRAINER_STATE
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing (a checkpoint of an older Seedline, which kept this state in "
                                "a pickle: delete the checkpoints directory to start over)")
    return json.loads(f.read_text())
