"""Config pieces shared by the training stages (pretrain, sft, dpo); torch-free.

Each training stage's config subclasses ``TrainingStageConfig`` (sections ``train``, ``scaling``,
``deepspeed``, ``checkpoint``, ``eval`` and ``log_every``) and declares its own defaults once by
re-declaring a section with a default instance, e.g. ``train: TrainConfig = TrainConfig(lr=1e-6)``; a
partial block in a pipeline config is merged key by key under those defaults (``StrictModel``). See
``stages/lm/trainer.py`` for how ``fit`` uses them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, model_validator

from pipeline.errors import ConfigError
from pipeline.stage import StrictModel, added, volatile


class TrainConfig(StrictModel):
    """The optimisation: ``steps`` optimizer steps of ``micro_batch * grad_accum * num_workers`` rows,
    AdamW with linear warmup over ``warmup`` steps, then cosine decay from ``lr`` to ``min_lr``."""

    steps: int = Field(1000, gt=0)
    micro_batch: int = Field(8, gt=0, description="rows per worker per forward/backward")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    warmup: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    clip: float = Field(1.0, gt=0, description="gradient clipping: max global L2 norm")
    seed: int = 0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    nan_policy: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss stops training (naming the step) or skips that micro-batch")
    skip_data: list[tuple[int, int]] = added(
        [], description="[first, last] step ranges (1-based) whose data is skipped: before optimizer step "
                        "`first` the micro-batches of steps first..last are passed over (what a health "
                        "rollback does, written out to reproduce it from the start)")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup > self.steps:
            raise ValueError(f"warmup ({self.warmup}) must not exceed steps ({self.steps})")
        for b in self.betas:
            if not 0 <= b < 1:
                raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        for first, last in self.skip_data:
            if not 1 <= first <= last:
                raise ValueError(f"skip_data: [{first}, {last}] is not a range of steps (1 <= first <= last)")
        return self


class WorkerRange(StrictModel):
    """Elastic training: Ray Train runs between ``min`` and ``max`` workers, as many as the cluster can
    place, and restarts the group at another size when a node is lost or capacity comes back."""

    min: int = Field(gt=0)
    max: int = Field(gt=0)

    @model_validator(mode="after")
    def _check(self) -> WorkerRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self

    def fingerprint_value(self) -> int:
        """What identifies the result: the global batch is sized for ``max`` workers, and every size in
        the range trains on that same batch (gradient accumulation makes up the difference)."""
        return self.max


def _count_or_range(value: Any) -> str:
    return "~range" if isinstance(value, dict | WorkerRange) else "~count"


class ScalingConfig(StrictModel):
    """Where the workers run (Ray Train ``ScalingConfig`` and ``FailureConfig``).

    ``num_workers`` is a count or a range ``{min, max}`` (elastic). The global batch is always
    ``train.micro_batch * train.grad_accum * max`` rows; at ``w`` workers each optimizer step accumulates
    ``grad_accum * max / w`` micro-batches, so a resume at another size continues the same optimisation."""

    num_workers: Annotated[Annotated[int, Field(gt=0), Tag("~count")] | Annotated[WorkerRange, Tag("~range")],
                           Discriminator(_count_or_range)] = Field(
        2, description="workers, or {min, max} for elastic training (see the class docstring)")
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, gt=0)
    max_failures: int = Field(3, ge=0, description="worker-group restarts before the stage fails")
    resources: dict[str, float] = volatile(
        {}, description="custom Ray resources each worker asks for besides CPU/GPU, e.g. {trainer: 1} to "
                        "keep training on the nodes that declare that resource (`ray start --resources`)")
    peak_flops: float | None = Field(
        None, gt=0, description="per-device peak FLOP/s for MFU when the device is not in the built-in "
                                "table (e.g. a CPU); None = no MFU on unknown devices")

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers.min

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers.max

    def ray_num_workers(self) -> int | tuple[int, int]:
        """Ray Train's ``ScalingConfig(num_workers=...)``: a count, or ``(min, max)`` for elastic training."""
        return self.num_workers if isinstance(self.num_workers, int) else (self.min_workers, self.max_workers)


def accumulation(train: TrainConfig, scaling: ScalingConfig, world: int) -> int:
    """Micro-batches per optimizer step at ``world`` workers, keeping the global batch of ``max`` workers."""
    rows = train.grad_accum * scaling.max_workers
    if rows % world:
        raise ValueError(f"the global batch of {train.micro_batch} x {train.grad_accum} x "
                         f"{scaling.max_workers} rows cannot be split over {world} workers in whole "
                         f"micro-batches of {train.micro_batch}: choose scaling.num_workers sizes that "
                         f"divide train.grad_accum x max workers ({rows})")
    return rows // world


class DeepSpeedSpec(StrictModel):
    """The DeepSpeed engine: ZeRO stage, CPU offload, activation checkpointing, ``torch.compile``, and raw
    DeepSpeed keys deep-merged into the generated config last (``extra``)."""

    zero_stage: int = Field(2, ge=0, le=3)
    offload: bool = Field(False, description="offload optimizer state (and ZeRO-3 parameters) to CPU")
    activation_checkpointing: bool = False
    compile: bool = False
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedSpec:
        if self.offload and self.zero_stage == 0:
            raise ValueError("offload needs zero_stage >= 1")
        return self


class CheckpointConfig(StrictModel):
    """Save every ``every`` optimizer steps (and at the end); keep the newest ``keep`` complete ones."""

    every: int = Field(500, gt=0)
    keep: int = Field(2, ge=1)


class EvalConfig(StrictModel):
    """Validation every ``every`` steps (0 = only at the end) over ``batches`` micro-batches per worker."""

    every: int = Field(0, ge=0)
    batches: int = Field(8, gt=0)


class HealthConfig(StrictModel):
    """When a training stage counts as stalled or diverging, and what then happens.

    Stalled: a worker sent no heartbeat, or no rank advanced a step, for ``stall_factor`` median step
    times (at least ``stall_min_s``). ``on_stall: fail`` kills the stalled worker so Ray Train restarts the
    group from the newest checkpoint (``scaling.max_failures``). A loss spike: the step's loss (mean over
    ranks) above ``spike_factor`` times the median of the last ``spike_window`` normal steps, judged after
    ``warmup_steps`` steps; ``spike_steps`` spikes in a row are a divergence. ``on_spike``: ``warn`` logs;
    ``skip_batch`` drops every spiking micro-batch before its backward; ``rollback`` reloads the newest
    complete checkpoint at a divergence and skips the data since it (at most ``max_rollbacks`` times);
    ``fail`` stops the stage at a divergence.
    """

    stall_factor: float = volatile(10.0, gt=1)
    stall_min_s: float = volatile(60.0, gt=0)
    on_stall: Literal["warn", "fail"] = volatile("warn")
    spike_factor: float = Field(2.0, gt=1)
    spike_window: int = Field(50, ge=1)
    spike_steps: int = Field(3, ge=1)
    warmup_steps: int = Field(10, ge=1)
    on_spike: Literal["warn", "skip_batch", "rollback", "fail"] = "warn"
    max_rollbacks: int = Field(3, ge=0)

    def rules(self) -> dict[str, Any]:
        """The thresholds as ``pipeline.health.HealthRules`` fields (what ``seedline status`` judges by)."""
        keys = ("stall_factor", "stall_min_s", "spike_factor", "spike_window", "spike_steps", "warmup_steps")
        return {k: getattr(self, k) for k in keys}


class TrainingStageConfig(StrictModel):
    """The sections every training stage has; ``fit`` takes this type. Subclasses add their data fields
    and re-declare a section with a default instance to set the stage's own defaults."""

    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    log_every: int = volatile(10, ge=1, description="steps between MLflow metric points and log lines")
    health: HealthConfig = added(HealthConfig())

    @model_validator(mode="after")
    def _check_sizes(self) -> TrainingStageConfig:
        for w in range(self.scaling.min_workers, self.scaling.max_workers + 1):
            try:
                accumulation(self.train, self.scaling, w)
            except ValueError as e:
                raise ValueError(f"scaling.num_workers: {e}") from None
        return self


def start_model_check(stage: str, upstream: str) -> Callable[[BaseModel, dict[str, list[str]]], None]:
    """The cross-stage rule of a fine-tuning stage: it starts from a model, the one bound to its ``model``
    input (the ``upstream`` instance, or the instance ``init_from`` names) or the directory ``init_from``
    names."""

    def check(config: BaseModel, bound: dict[str, list[str]]) -> None:
        model = bound.get("model") or []
        if not model and not config.init_from:
            raise ConfigError(f"stages.{stage}.init_from",
                              f"required when the pipeline has no {upstream} stage: a Hugging Face model "
                              "directory or the name of a stage instance that outputs a model")
        if model and config.init_from and model != [config.init_from]:
            # a directory in init_from while an upstream instance is bound: two starting models
            raise ConfigError(f"stages.{stage}.init_from",
                              f"the pipeline has the {upstream} stage '{model[0]}', whose model this stage "
                              f"starts from; remove stages.{stage}.init_from, or set it to an instance name")

    return check
