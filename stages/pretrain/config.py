"""Configuration of the pretrain stage (torch-free)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from pipeline.errors import ConfigError
from pipeline.preflight import MODEL_DIR
from pipeline.stage import StrictModel, added
from stages.lm.presets import ModelSpec
from stages.lm.train_config import EvalConfig, TrainingStageConfig


class MixtureOptions(StrictModel):
    """How a weighted mixture (``data``) is drawn."""

    on_exhausted: Literal["repeat", "stop"] = Field(
        "repeat", description="a source that runs out of rows: start another epoch of it (its epochs are "
                              "logged) or end the run there")


class PretrainConfig(TrainingStageConfig):
    """Train a causal LM from scratch on the tokenize stage's packed rows.

    The vocabulary size and sequence length come from the tokenize stage's ``manifest.json`` (the preset
    supplies the rest of the shape); the tokenizer is copied into the exported ``model/``.
    """

    model: ModelSpec = Field(default_factory=ModelSpec)
    eval: EvalConfig = EvalConfig(every=200, batches=8)
    doc_mask: bool = Field(False, description="attend only within each packed document (else across them)")
    init_from: str | None = Field(
        None, description="continue training a model: the name of a stage instance that outputs one (its "
                          "weights; the shape comes from that model, `model` is ignored) or a Hugging Face "
                          "Llama directory",
        json_schema_extra=MODEL_DIR)
    data: dict[str, float] | None = added(
        None, description="a weighted mixture of tokenize instances, {instance: weight} (weights are "
                          "relative); default: the pipeline's tokenize instance. Changing weights "
                          "re-tokenizes nothing")
    mixture: MixtureOptions = added(MixtureOptions())

    @field_validator("data")
    @classmethod
    def _weights(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            if not v:
                raise ValueError("name at least one tokenize instance, e.g. {web: 0.7, code: 0.3}")
            bad = {k: w for k, w in v.items() if not (math.isfinite(w) and w > 0)}
            if bad:
                raise ValueError(f"weights must be positive numbers: {bad}")
        return v


def check(config: BaseModel, bound: dict[str, list[str]]) -> None:
    """Cross-stage rule: a mixture's weights name exactly the instances its data input is bound to."""
    data = getattr(config, "data", None)
    if data and set(bound.get("data", [])) != set(data):
        raise ConfigError("stages.pretrain.data",
                          f"weights for {sorted(data)} but the data input is bound to {bound.get('data')} "
                          "(stages.pretrain.inputs): name the same instances")
