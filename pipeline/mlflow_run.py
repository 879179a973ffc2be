"""What a pipeline run leaves in MLflow beyond metrics: the parent run's config artifact, attempt-unique
name and end-of-run summary, each stage's resolved config, declared outputs and inputs.

- parent run: ``pipeline.yaml`` (the resolved config), the name ``<name>`` then ``<name> (attempt N)``,
  and at the end summary metrics of every stage (``pipeline.compare.summary``: final losses, tokens,
  evaluation results, wall time);
- stage run: ``config.json``; every declared output that is a small file or directory (at most
  ``ARTIFACT_LIMIT`` bytes: a model, ``metrics.jsonl``, ``results.json``) as an artifact under
  ``outputs/<kind>``, larger ones as a tag naming their path; every bound input as an MLflow dataset input
  (digest = the upstream instance's fingerprint), so a training run shows the tokenized data it read.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline import storage
from pipeline.redact import redact_obj

ARTIFACT_LIMIT = 256 << 20


def _size(path: str) -> int | None:
    """Bytes under a local path (None when it is missing or not local)."""
    local = storage.local(path)
    if local is None or not local.exists():
        return None
    if local.is_file():
        return local.stat().st_size
    return sum(f.stat().st_size for f in local.rglob("*") if f.is_file())


def open_parent(tracking: Any, run_id: str, name: str, attempt: int, config: dict[str, Any]) -> None:
    """Name the parent run for this attempt and attach the resolved pipeline config."""
    label = name if attempt <= 1 else f"{name} (attempt {attempt})"
    tracking.client.update_run(run_id, name=label)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "pipeline.yaml"
        p.write_text(yaml.safe_dump(redact_obj(config), sort_keys=False))  # no credentials, ever
        tracking.client.log_artifact(run_id, str(p))


def close_parent(tracking: Any, run_id: str, run_dir: str) -> None:
    """Summary metrics of every stage on the parent run (one value each, at step 0)."""
    from mlflow.entities import Metric

    from pipeline.compare import summary

    now = int(time.time() * 1000)
    values = {k: float(v) for k, v in summary(run_dir).items() if isinstance(v, int | float)}
    metrics = [Metric(k, v, now, 0) for k, v in sorted(values.items())]
    for i in range(0, len(metrics), 900):
        tracking.client.log_batch(run_id, metrics=metrics[i:i + 900])


def stage_artifacts(tracker: Any, stage_dir: str, outputs: dict[str, str]) -> None:
    """The stage's resolved config and its declared outputs (small ones as artifacts)."""
    if not getattr(tracker, "run_id", None):
        return
    config = storage.local(storage.join(stage_dir, "config.json"))
    if config is not None and config.exists():
        tracker.log_artifact(str(config))
    tags = {}
    for kind, rel in sorted(outputs.items()):
        if kind.startswith("stage:") or not rel:
            continue
        path = storage.join(stage_dir, rel)
        if not storage.exists(path):  # an optional output this run did not make (sft's adapter/ without lora)
            continue
        size = _size(path)
        if size is None or size > ARTIFACT_LIMIT:
            tags[f"seedline.output.{kind}"] = path
            continue
        local = storage.local(path)
        tracker.log_artifact(str(local), f"outputs/{kind}" if local.is_dir() else "outputs")
        tags[f"seedline.output.{kind}"] = path
    if tags:
        tracker.set_tags(tags)


def stage_inputs(tracker: Any, inputs: dict[str, list[Any]]) -> None:
    """Each bound input as an MLflow dataset input: name ``<instance>.<kind>``, digest its fingerprint."""
    if not getattr(tracker, "run_id", None) or not inputs:
        return
    from mlflow.entities import Dataset, DatasetInput, InputTag

    datasets = []
    for slot, outs in inputs.items():
        for o in outs:
            ds = Dataset(name=f"{o.instance}.{o.kind}", digest=o.fingerprint or "unknown",
                         source_type="seedline", source=o.path)
            datasets.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", slot)]))
    tracker.client.log_inputs(tracker.run_id, datasets=datasets)

