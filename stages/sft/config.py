"""Configuration of the sft stage (torch-free: loaded when configs are validated)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.preflight import EVAL_DATA, GLOBS, MODEL_DIR
from pipeline.stage import added
from stages.lm.lora_config import LoraSpec
from stages.lm.train_config import TrainConfig, TrainingStageConfig, start_model_check


class SFTConfig(TrainingStageConfig):
    """Supervised fine-tuning on chat data with an assistant-only loss.

    The model starts from the pretrain stage's ``model/`` (or ``init_from``, a Hugging Face Llama
    directory). The tokenizer is the tokenize stage's with a pretrain model, the ``init_from`` model's own
    otherwise (the tokenize stage's if that directory has none). Results depend only on the non-volatile
    fields.
    """

    data: str | list[str] = Field(
        description="glob(s) of JSONL (.gz/.zst) or Parquet files with 'messages' or 'prompt'/'completion'",
        json_schema_extra=GLOBS)
    val: str | list[str] | None = Field(
        None, description="held-out file glob(s); default: val_fraction of the data (by content hash)",
        json_schema_extra={**GLOBS, **EVAL_DATA})
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share held out when `val` is not set")
    max_len: int = Field(2048, ge=8, le=1 << 20, description="tokens per row (an example, or a packed row)")
    packing: bool = Field(True, description="pack examples best-fit-decreasing into rows of max_len tokens")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="examples longer than max_len: cut at max_len, or leave out (both counted)")
    init_from: str | None = Field(None, description="a Hugging Face model directory to start from "
                                                    "(only without a pretrain stage)",
        json_schema_extra=MODEL_DIR)
    # Fine-tuning defaults: TRL's SFTTrainer learning rate, no weight decay.
    train: TrainConfig = TrainConfig(steps=1000, lr=2e-5, min_lr=2e-6, warmup=30, weight_decay=0.0)
    lora: LoraSpec | None = added(None, description="train low-rank adapters instead of every weight: "
                                                     "adapter/ (PEFT format) and model/ (merged)")

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        for name in ("data", "val"):
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                raise ValueError(f"{name} must name at least one glob")
        return self


# Cross-stage rule: the model comes from the pretrain stage or from ``init_from``, never both.
check = start_model_check("sft", "pretrain")
