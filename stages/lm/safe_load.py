"""Loading DeepSpeed checkpoint files without running code from them.

DeepSpeed's own checkpoint engine reads its ``.pt`` files with ``torch.load(weights_only=False)``: a
pickle planted in a writable workdir (an S3 bucket, an NFS share) would run on every training worker at
the next resume. Seedline swaps in ``SafeCheckpointEngine``, which loads with ``weights_only=True`` and
allows, besides tensors and plain containers, only the few DeepSpeed types its files hold (``ALLOWED``).
Anything else is refused with ``UnsafeCheckpoint`` before a single object of it is built.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file holds a type outside the allow-list (it could run code when loaded)."""


def allowed_globals() -> list[Any]:
    """The non-tensor types DeepSpeed's checkpoint files hold (ZeRO 0-3, CPU and GPU)."""
    import argparse
    import collections

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, collections.OrderedDict,
            argparse.Namespace]


def safe_torch_load(path: str | Path, map_location: Any = None, load: Any = None) -> Any:
    """``torch.load`` (or ``load``, the original when ``torch.load`` itself is patched) restricted to
    tensors, containers and ``allowed_globals()``."""
    import torch

    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return (load or torch.load)(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise UnsafeCheckpoint(f"{path}: refused to load this checkpoint file: it holds an object that is "
                               f"not on Seedline's allow-list and could run code ({why.strip()}). Delete "
                               "the checkpoint if you did not write it") from None


def install_safe_engine(engine: Any) -> None:
    """Make ``engine`` (a DeepSpeed engine) read checkpoint files with ``safe_torch_load``."""
    ce = engine.checkpoint_engine
    if ce is not None:
        ce.load = lambda path, map_location=None: safe_torch_load(path, map_location)


@contextlib.contextmanager
def guarded(path: Path) -> Iterator[None]:
    """Turn an ``UnsafeCheckpoint`` raised deep inside DeepSpeed into a one-line error naming ``path``."""
    try:
        yield
    except UnsafeCheckpoint:
        raise
    except pickle.UnpicklingError as e:  # a loader outside the engine (never expected)
        raise UnsafeCheckpoint(f"{path}: refused to load: {e}") from None
