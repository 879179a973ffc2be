"""Configuration of the sft stage (torch-free: loaded when configs are validated)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.stage import StrictModel, volatile
from stages.lm.train_config import (
    CheckpointConfig,
    DeepSpeedSpec,
    EvalConfig,
    ScalingConfig,
    TrainConfig,
    start_model_check,
)

# Fine-tuning defaults (TRL's SFTTrainer lr, no weight decay); a partial `train:` block is merged into them.
TRAIN_DEFAULTS: dict[str, Any] = dict(steps=1000, lr=2e-5, min_lr=2e-6, warmup=30, weight_decay=0.0)


class SFTConfig(StrictModel):
    """Supervised fine-tuning on chat data with an assistant-only loss.

    The model starts from the pretrain stage's ``model/`` (or ``init_from``, a Hugging Face Llama
    directory). The tokenizer is the tokenize stage's with a pretrain model, the ``init_from`` model's own
    otherwise (the tokenize stage's if that directory has none). Results depend only on the non-volatile
    fields.
    """

    data: str | list[str] = Field(
        description="glob(s) of JSONL (.gz/.zst) or Parquet files with 'messages' or 'prompt'/'completion'")
    val: str | list[str] | None = Field(
        None, description="held-out file glob(s); default: val_fraction of the data (by content hash)")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share held out when `val` is not set")
    max_len: int = Field(2048, ge=8, le=1 << 20, description="tokens per row (an example, or a packed row)")
    packing: bool = Field(True, description="pack examples best-fit-decreasing into rows of max_len tokens")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="examples longer than max_len: cut at max_len, or leave out (both counted)")
    init_from: str | None = Field(None, description="a Hugging Face model directory to start from "
                                                    "(only without a pretrain stage)")
    train: TrainConfig = TrainConfig(**TRAIN_DEFAULTS)
    scaling: ScalingConfig = ScalingConfig()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    log_every: int = volatile(10, ge=1, description="training metrics to MLflow every this many steps")

    @field_validator("train", mode="before")
    @classmethod
    def _train_defaults(cls, value: Any) -> Any:
        return {**TRAIN_DEFAULTS, **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        for name in ("data", "val"):
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                raise ValueError(f"{name} must name at least one glob")
        return self


# Cross-stage rule: the model comes from the pretrain stage or from ``init_from``, never both.
check = start_model_check("sft", "pretrain")
