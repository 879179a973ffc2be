"""Configuration of the pretrain stage (torch-free)."""

from __future__ import annotations

from pydantic import Field

from pipeline.preflight import MODEL_DIR
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
    init_from: str | None = Field(
        None, description="continue training a model: the name of a stage instance that outputs one (its "
                          "weights; the shape comes from that model, `model` is ignored) or a Hugging Face "
                          "Llama directory",
        json_schema_extra=MODEL_DIR)
