"""Configuration of the evaluate stage (torch-free: loaded by the core to validate and fingerprint)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from pipeline.errors import ConfigError
from pipeline.stage import StrictModel, volatile

MODEL_STAGES = ("pretrain", "sft", "dpo")  # the stages whose <out>/model/ is evaluated, in pipeline order
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PerplexityConfig(StrictModel):
    """Token loss, perplexity and bits per byte on the tokenize stage's ``val`` split."""

    enabled: bool = True
    batches: int = Field(0, ge=0, description="batches of `batch_size` rows to score; 0 = the whole split")
    doc_mask: bool = Field(
        True,
        description="score each packed document on its own (as lm-eval scores "
        "documents); false: attend across documents within a row",
    )


class TaskConfig(StrictModel):
    """A multiple-choice task: JSONL records ``{"context", "choices", "gold"}`` scored by log-likelihood."""

    name: str = Field(description="metric prefix: <name>/acc, <name>/acc_norm")
    path: str = Field(description="JSONL file (local or URL)")
    num_fewshot: int = Field(
        0, ge=0, description="solved examples from the same file put before each context"
    )
    limit: int | None = Field(None, ge=1, description="score only the first `limit` records")
    seed: int = Field(1234, ge=0, description="seed of the few-shot draws (lm-eval's default)")

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if not _TASK_NAME.match(self.name):
            raise ValueError(f"task name {self.name!r} must be letters, digits, '_', '.', '-'")
        return self


class RegistryConfig(StrictModel):
    """Register the best model (by ``metric``) in the MLflow model registry under ``name@alias``."""

    enabled: bool = True
    name: str = Field("seedline-lm", min_length=1, description="registered model name")
    alias: str = Field("candidate", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    metric: str = Field("perplexity", description="a metric of results.json, e.g. perplexity or mc/acc_norm")
    mode: Literal["min", "max"] = "min"


class EvalScaling(StrictModel):
    """Resources of the Ray task that evaluates one model."""

    use_gpu: bool = Field(False, description="one GPU per model task (scores stay fp32)")
    cpus: int = volatile(1, ge=1, description="CPUs (torch threads) per model task")


class EvaluateConfig(StrictModel):
    """Evaluate every model the pipeline trains (pretrain, sft, dpo: those present) on the same data.

    Results depend only on the non-volatile fields (and the upstream stages).
    """

    perplexity: PerplexityConfig = PerplexityConfig()
    tasks: list[TaskConfig] = Field(default_factory=list)
    prompts: str | None = Field(None, description='JSONL of {"prompt": ...} for greedy generations')
    max_new_tokens: int = Field(64, ge=1)
    chat_models: list[str] = Field(
        default_factory=lambda: ["sft", "dpo"],
        description="models whose prompts are rendered with the ChatML template (instruction-tuned)",
    )
    preference: bool | Literal["auto"] = Field(
        "auto",
        description="held-out preference accuracy on the dpo stage's val pairs (auto: when it has them)",
    )
    preference_limit: int | None = Field(None, ge=1, description="score only the first pairs")
    registry: RegistryConfig = RegistryConfig()
    scaling: EvalScaling = EvalScaling()
    batch_size: int = Field(8, ge=1, description="sequences per forward pass (and rows per perplexity batch)")

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique: {', '.join(dup)}")
        unknown = sorted(set(self.chat_models) - set(MODEL_STAGES))
        if unknown:
            raise ValueError(f"chat_models {unknown} are not model stages ({', '.join(MODEL_STAGES)})")
        return self

    def metric_names(self, present: set[str] | None = None) -> list[str]:
        """Metrics this configuration can produce in a pipeline of ``present`` stages (a model gets a
        subset: the pref_* metrics need the dpo stage's pairs, pref_accuracy and pref_margin are the dpo
        model's)."""
        out = ["loss", "perplexity", "bits_per_byte"] if self.perplexity.enabled else []
        for t in self.tasks:
            out += [f"{t.name}/acc", f"{t.name}/acc_norm"]
        if self.preference is not False and (present is None or "dpo" in present):
            out += ["pref_logp_accuracy", "pref_accuracy", "pref_margin"]
        return out


def check(config: BaseModel, present: set[str]) -> None:
    """Cross-stage rules: at least one model to evaluate; a registry metric this pipeline computes."""
    if not present & set(MODEL_STAGES):
        raise ConfigError(
            "stages.evaluate", f"needs a model: add one of stages.{', stages.'.join(MODEL_STAGES)}"
        )
    if getattr(config, "preference", "auto") is True and "dpo" not in present:
        raise ConfigError("stages.evaluate.preference", "true needs a dpo stage (its val pairs); use auto")
    registry = getattr(config, "registry", None)
    if registry is not None and registry.enabled and registry.metric not in config.metric_names(present):
        raise ConfigError(
            "stages.evaluate.registry.metric",
            f"{registry.metric!r} is not computed by this pipeline; choose one of "
            f"{', '.join(config.metric_names(present))}",
        )
