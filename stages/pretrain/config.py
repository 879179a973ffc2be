"""Configuration of the pretrain stage (torch-free)."""

from __future__ import annotations

from pydantic import Field

from stages.lm.presets import ModelSpec
from stages.lm.train_config import EvalConfig, TrainingStageConfig


class PretrainConfig(TrainingStageConfig):
    """Train a causal LM from scratch on the tokenize stage's packed rows.

    The vocabulary size and sequence length come from the tokenize stage's ``manifest.json`` (the preset
    supplies the rest of the shape); the tokenizer is copied into the exported ``model/``.
    """

    model: ModelSpec = Field(default_factory=ModelSpec)
    eval: EvalConfig = EvalConfig(every=200, batches=8)
    doc_mask: bool = Field(False, description="attend only within each packed document (else across them)")
