"""The DeepSpeed config generated from a training stage's config, and the learning-rate schedule
(torch-free, so both are unit-testable without a process group)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace
from typing import Any

from stages.lm.train_config import DeepSpeedSpec, TrainConfig


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, recursing into nested dicts (``extra`` wins)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ds_config(train: TrainConfig, spec: DeepSpeedSpec, world_size: int, use_gpu: bool) -> dict[str, Any]:
    """DeepSpeed config: ZeRO stage, batch sizes, clipping, bf16 on GPU / fp32 on CPU, offload.

    On GPU the optimizer is DeepSpeed's (fused AdamW, or CPU Adam with offload) and is named here; on CPU
    the trainer passes torch's AdamW as a client optimizer. The schedule is the trainer's own
    (``lr_factor``), passed as a client scheduler, so its state is in every checkpoint.
    """
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    if spec.zero_stage >= 1:
        zero |= {"overlap_comm": use_gpu, "contiguous_gradients": True, "reduce_scatter": True}
    if spec.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
        if spec.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch * train.grad_accum * world_size,
        "gradient_clipping": train.clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_gpu},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed's own step lines out
        "wall_clock_breakdown": False,
    }
    if use_gpu:
        cfg["optimizer"] = {"type": "AdamW", "params": {
            "lr": train.lr, "betas": list(train.betas), "eps": train.eps, "weight_decay": train.weight_decay}}
    return deep_merge(cfg, spec.extra)


def lr_at(train: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr`` over ``warmup`` steps,
    then cosine decay to ``min_lr`` at the last step."""
    if step < train.warmup:
        return train.lr * (step + 1) / train.warmup
    span = max(1, train.steps - 1 - train.warmup)
    progress = min(1.0, (step - train.warmup) / span)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_factor(train: TrainConfig):
    """``LambdaLR`` multiplier for step ``s`` (a picklable callable)."""
    return _Factor(train)


class _Factor:
    # LambdaLR.state_dict() pickles a callable object's __dict__ into every checkpoint, and checkpoints
    # load with weights_only=True: keep only plain numbers here, never the TrainConfig itself.
    def __init__(self, train: TrainConfig):
        self.schedule = {k: getattr(train, k) for k in ("lr", "min_lr", "warmup", "steps")}

    def __call__(self, step: int) -> float:
        s = self.schedule
        return lr_at(SimpleNamespace(**s), step) / s["lr"]
