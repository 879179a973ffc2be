"""Importing DeepSpeed without MLflow: 2 s less start-up in every training worker.

``import deepspeed`` imports its autotuner, which imports MLflow when it can (``try: import mlflow``): about
2 of DeepSpeed's 3 s of import on this machine, paid by every worker process of every training run,
although Seedline never runs DeepSpeed's autotuner. With ``mlflow`` marked absent while DeepSpeed is
imported, the autotuner records ``has_mlflow = False`` and nothing else changes; the mark is removed
afterwards, so rank 0 still imports the real MLflow when it tracks metrics.
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_deepspeed() -> ModuleType:
    """``import deepspeed``, without importing MLflow on the way (see the module docstring)."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    block = "mlflow" not in sys.modules
    if block:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    try:
        import deepspeed
    finally:
        if block and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed
