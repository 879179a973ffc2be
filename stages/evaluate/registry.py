"""Choosing the best model, logging it with MLflow and registering it under ``name@alias`` with its lineage.

The model is saved in the ``pyfunc`` flavour (``stages/evaluate/pyfunc_model.py``: the exported HF
directory plus Seedline's code), logged as the artifact ``model`` of the evaluate stage's MLflow run, and
registered as a new version of ``registry.name``. The version's tags say where it came from: the run
directory, the tokenizer's sha256, the model stage, the metric it won on, and the fingerprint of every
upstream stage (``seedline.fingerprint.<stage>``: the data stages dedupe and tokenize included).

Registering is idempotent: a version already registered from this MLflow run for the same stage is
reused (a resumed stage never registers twice).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline import storage
from stages.evaluate.config import MODEL_STAGES, RegistryConfig

PIP_REQUIREMENTS = ("torch", "tokenizers", "safetensors", "numpy", "pydantic", "pyyaml", "fsspec", "pyarrow")


def best_model(models: dict[str, dict[str, float]], cfg: RegistryConfig) -> tuple[str, float | None]:
    """(stage, value) of the best model by ``cfg.metric``; ties go to the later (more trained) stage.
    Without a metric: the last model of the chain (``models`` is in pipeline order), value None."""
    if cfg.metric is None:
        return list(models)[-1], None
    ranked = [
        (s, v[cfg.metric]) for s, v in models.items() if cfg.metric in v and not math.isnan(v[cfg.metric])
    ]
    if not ranked:
        have = sorted({m for v in models.values() for m in v})
        raise ValueError(
            f"registry.metric {cfg.metric!r} was computed for no model; metrics: {', '.join(have)}"
        )
    sign = 1.0 if cfg.mode == "max" else -1.0
    order = {s: MODEL_STAGES.index(s) if s in MODEL_STAGES else -1 for s, _ in ranked}
    return max(ranked, key=lambda sv: (sign * sv[1], order[sv[0]]))


def _code_copy(dest: Path) -> list[str]:
    """Seedline's packages (without caches), shipped with the model so it loads where Seedline is absent."""
    import pipeline
    import stages

    paths = []
    for pkg in (pipeline, stages):
        src = Path(list(pkg.__path__)[0])
        shutil.copytree(src, dest / src.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        paths.append(str(dest / src.name))
    return paths


def save_pyfunc(model_dir: str, dest: Path) -> None:
    """Write the pyfunc model for the HF directory ``model_dir`` (local or URL) at ``dest``."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from stages.evaluate.pyfunc_model import SeedlineLM

    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 32), ParamSpec("chat", "boolean", False)]),
    )
    with tempfile.TemporaryDirectory(prefix="seedline-reg-") as tmp:
        local = storage.download_dir(model_dir, Path(tmp) / "model")
        mlflow.pyfunc.save_model(
            str(dest),
            python_model=SeedlineLM(),
            artifacts={"model": str(local)},
            code_paths=_code_copy(Path(tmp) / "code"),
            signature=signature,
            pip_requirements=list(PIP_REQUIREMENTS),
        )


def _existing_version(client: Any, name: str, run_id: str, stage: str) -> Any | None:
    """The version registered from this run for ``stage`` (a resumed stage registers once)."""
    for v in client.search_model_versions(f"name='{name}'"):
        if v.run_id == run_id and v.tags.get("seedline.stage") == stage:
            return v
    return None


def register_model(
    tracking_uri: str, run_id: str, model_dir: str, stage: str, cfg: RegistryConfig, tags: dict[str, str]
) -> dict[str, Any]:
    """Log ``model_dir`` to the run ``run_id`` and register it; returns name, version, alias, uri."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = _existing_version(client, cfg.name, run_id, stage)
    if version is None:
        with tempfile.TemporaryDirectory(prefix="seedline-pyfunc-") as tmp:
            dest = Path(tmp) / "model"
            save_pyfunc(model_dir, dest)
            client.log_artifacts(run_id, str(dest), "model")
        try:
            client.create_registered_model(cfg.name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        version = client.create_model_version(cfg.name, source, run_id=run_id, tags={"seedline.stage": stage})
    for k, v in tags.items():
        client.set_model_version_tag(cfg.name, version.version, k, v)
    why = tags.get("seedline.why") or f"the best by {tags.get('seedline.metric')}"
    description = (f"The {stage} model of run {tags.get('seedline.run_dir', '?')}, registered by Seedline's "
                   f"evaluate stage: {why}.")
    client.update_model_version(cfg.name, version.version, description=description)
    client.set_registered_model_alias(cfg.name, cfg.alias, version.version)
    return {
        "name": cfg.name,
        "version": int(version.version),
        "alias": cfg.alias,
        "stage": stage,
        "uri": f"models:/{cfg.name}@{cfg.alias}",
        "run_id": run_id,
    }
