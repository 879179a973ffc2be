"""Configuration of the pretrain stage (torch-free)."""

from __future__ import annotations

from pydantic import Field

from pipeline.stage import StrictModel, volatile
from stages.lm.presets import ModelSpec
from stages.lm.train_config import CheckpointConfig, DeepSpeedSpec, EvalConfig, ScalingConfig, TrainConfig


class PretrainConfig(StrictModel):
    """Train a causal LM from scratch on the tokenize stage's packed rows.

    The vocabulary size and sequence length come from the tokenize stage's ``manifest.json`` (the preset
    supplies the rest of the shape); the tokenizer is copied into the exported ``model/``.
    """

    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig(every=200, batches=8))
    doc_mask: bool = Field(False, description="attend only within each packed document (else across them)")
    log_every: int = volatile(10, gt=0, description="steps between MLflow metric points and log lines")
