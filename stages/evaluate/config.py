"""Configuration of the evaluate stage (torch-free: loaded by the core to validate and fingerprint)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from pipeline.errors import ConfigError
from pipeline.preflight import EVAL_DATA, FILE
from pipeline.stage import StrictModel, added, volatile

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
    path: str = Field(description="JSONL file (local or URL)", json_schema_extra={**FILE, **EVAL_DATA})
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
    """Register a model in the MLflow model registry under ``name@alias``: the best by ``metric`` when one
    is named, else the last model of the chain (what the pipeline sets out to produce: the dpo model of
    pretrain -> sft -> dpo)."""

    enabled: bool = True
    name: str = Field("seedline-lm", min_length=1, description="registered model name")
    alias: str = Field("candidate", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    metric: str | None = Field(None, description="a metric of results.json, e.g. perplexity or mc/acc_norm; "
                                                 "none: the last model of the chain")
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
    prompts: str | None = Field(None, description='JSONL of {"prompt": ...} for greedy generations',
                                json_schema_extra={**FILE, **EVAL_DATA})
    max_new_tokens: int = Field(64, ge=1)
    models: list[str] | None = Field(
        None, description="stage instances whose models are evaluated, in this order (default: every "
                          "instance of the pipeline that outputs a model, in pipeline order)")
    chat_models: list[str] = Field(
        default_factory=lambda: ["sft", "dpo"],
        description="models whose prompts are rendered with the ChatML template (instruction-tuned): "
                    "instance names or stage types",
    )
    preference: bool | Literal["auto"] = Field(
        "auto",
        description="held-out preference accuracy on the dpo stage's val pairs (auto: when it has them)",
    )
    preference_limit: int | None = Field(None, ge=1, description="score only the first pairs")
    answer_loss: bool | Literal["auto"] = added(
        "auto", description="held-out instruction answer loss of every model on the sft stage's val "
                            "split (auto: when the pipeline has an sft stage)")
    answer_limit: int | None = added(None, ge=1, description="score only the first held-out examples")
    registry: RegistryConfig = RegistryConfig()
    scaling: EvalScaling = EvalScaling()
    batch_size: int = Field(8, ge=1, description="sequences per forward pass (and rows per perplexity batch)")

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique: {', '.join(dup)}")
        if self.models is not None and not self.models:
            raise ValueError("models must name at least one stage instance")
        return self

    def metric_names(self, has_pairs: bool = True, has_answers: bool = True) -> list[str]:
        """Metrics this configuration can produce, with or without a dpo stage's held-out pairs and an sft
        stage's held-out examples (a model gets a subset: pref_accuracy and pref_margin are the dpo
        model's)."""
        out = ["loss", "perplexity", "bits_per_byte"] if self.perplexity.enabled else []
        if self.answer_loss is not False and has_answers:
            out.append("answer_loss")
        for t in self.tasks:
            out += [f"{t.name}/acc", f"{t.name}/acc_norm"]
        if self.preference is not False and has_pairs:
            out += ["pref_logp_accuracy", "pref_accuracy", "pref_margin"]
        return out


def check(config: BaseModel, bound: dict[str, list[str]]) -> None:
    """Cross-stage rules: at least one model to evaluate; held-out pairs (examples) when preference
    (answer loss) is forced; a registry metric this pipeline computes."""
    if not bound.get("models"):
        raise ConfigError(
            "stages.evaluate", f"needs a model: add a stage that outputs one ({', '.join(MODEL_STAGES)})"
        )
    unknown = sorted(set(config.chat_models) - set(MODEL_STAGES) - set(bound["models"]))
    if unknown:
        raise ConfigError("stages.evaluate.chat_models",
                          f"{unknown} are neither evaluated instances ({', '.join(bound['models'])}) nor "
                          f"model stage types ({', '.join(MODEL_STAGES)})")
    has_pairs = bool(bound.get("pairs"))
    if config.preference is True and not has_pairs:
        raise ConfigError("stages.evaluate.preference", "true needs a dpo stage (its val pairs); use auto")
    has_answers = bool(bound.get("answers"))
    if config.answer_loss is True and not has_answers:
        raise ConfigError("stages.evaluate.answer_loss", "true needs an sft stage (its val split); use auto")
    registry = config.registry
    computed = config.metric_names(has_pairs, has_answers)
    if registry.enabled and registry.metric is not None and registry.metric not in computed:
        raise ConfigError(
            "stages.evaluate.registry.metric",
            f"{registry.metric!r} is not computed by this pipeline; choose one of "
            f"{', '.join(computed)}",
        )
