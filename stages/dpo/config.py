"""Configuration of the dpo stage (torch-free: loaded when configs are validated)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.preflight import EVAL_DATA, GLOBS, MODEL_DIR
from pipeline.stage import added
from stages.lm.lora_config import LoraSpec
from stages.lm.train_config import EvalConfig, TrainConfig, TrainingStageConfig, start_model_check


class DPOConfig(TrainingStageConfig):
    """Direct preference optimisation of the sft model against a frozen copy of itself.

    The policy and the reference start from the sft stage's ``model/`` (or ``init_from``, a Hugging Face
    Llama directory, only without an sft stage); the tokenizer is that model directory's (else the
    tokenize stage's). ``train.micro_batch`` counts pairs: each micro-batch is one forward pass over
    2 x micro_batch sequences (chosen and rejected). Results depend only on the non-volatile fields.
    """

    data: str | list[str] = Field(
        description="glob(s) of JSONL (.gz/.zst) or Parquet files with prompt/chosen/rejected (TRL format)",
        json_schema_extra=GLOBS)
    val: str | list[str] | None = Field(
        None, description="held-out pairs, glob(s); default: val_fraction of the data (by content hash)",
        json_schema_extra={**GLOBS, **EVAL_DATA})
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share held out when `val` is not set")
    max_len: int = Field(1024, ge=8, le=1 << 20, description="tokens per sequence (prompt + completion)")
    max_prompt_len: int = Field(512, ge=1, description="prompt tokens kept (the end of a longer prompt)")
    beta: float = Field(0.1, gt=0, description="strength of the KL penalty towards the reference")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="conservative DPO (sigmoid loss only)")
    reference: Literal["precompute", "in_memory"] = Field(
        "precompute", description="reference log-probs from a first pass over the data (one model in "
                                  "training), or a frozen reference model kept in memory; same results. "
                                  "With lora, in_memory (its default there) is the base with the adapters "
                                  "disabled: no second model")
    init_from: str | None = Field(None, description="a Hugging Face model directory to start from "
                                                    "(only without an sft stage)",
        json_schema_extra=MODEL_DIR)
    # DPO's usual settings (TRL's examples): a small learning rate, short warmup, no weight decay.
    train: TrainConfig = TrainConfig(steps=500, micro_batch=4, lr=1e-6, min_lr=0.0, warmup=10,
                                     weight_decay=0.0)
    eval: EvalConfig = EvalConfig(every=100, batches=16)
    lora: LoraSpec | None = added(None, description="train low-rank adapters instead of every weight: "
                                                     "adapter/ (PEFT format) and model/ (merged)")

    @model_validator(mode="after")
    def _check(self) -> DPOConfig:
        for name in ("data", "val"):
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                raise ValueError(f"{name} must name at least one glob")
        if self.max_prompt_len >= self.max_len:
            raise ValueError(f"max_prompt_len ({self.max_prompt_len}) must be below max_len ({self.max_len}) "
                             "to leave room for the completion")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing applies to the sigmoid loss only, not {self.loss_type!r}")
        if self.lora is not None and "reference" not in self.model_fields_set:
            self.reference = "in_memory"  # LoRA's reference: the base with the adapters disabled
        if self.lora is not None and self.lora.modules_to_save and self.reference == "in_memory":
            raise ValueError("lora.modules_to_save trains base modules in place, so the base with the "
                             "adapters disabled is no longer the reference: set reference: precompute")
        return self


# Cross-stage rule: the model comes from the sft stage or from ``init_from``, never both.
check = start_model_check("dpo", "sft")
