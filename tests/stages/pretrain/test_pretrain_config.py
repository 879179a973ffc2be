"""The pretrain stage's config: registration, validation errors, the generated DeepSpeed config and the
learning-rate schedule (no Ray, no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import validate_config
from pipeline.errors import ConfigError
from pipeline.fingerprint import stage_fingerprint
from pipeline.stage import get
from stages.lm.ds_config import deep_merge, ds_config, lr_at
from stages.lm.train_config import DeepSpeedSpec, TrainConfig
from stages.pretrain.config import PretrainConfig

REPO = Path(__file__).resolve().parents[3]


def _pipeline(pretrain: dict) -> dict:
    return {"name": "p", "stages": {"tokenize": {"input": "x/*.jsonl"}, "pretrain": pretrain}}


def test_registered_torch_free_and_consumes_tokenize():
    spec = get("pretrain")
    assert spec.inputs["data"].kind == "shards" and spec.inputs["data"].required
    assert spec.outputs["model"] == "model" and spec.config_model is PretrainConfig
    assert spec.run == "stages.pretrain.run:run"
    code = ("import sys, stages.pretrain; "
            "print(sorted({'torch', 'ray', 'deepspeed'} & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # configs load without the heavy libraries


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.deepspeed\.zero_stage"):
        validate_config(_pipeline({"deepspeed": {"zero_stage": 4}}))
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.train"):
        validate_config(_pipeline({"train": {"steps": 10, "warmup": 20}}))
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.scaling\.gpus"):
        validate_config(_pipeline({"scaling": {"gpus": 2}}))
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.model"):
        validate_config(_pipeline({"model": {"preset": "tiny", "overrides": {"width": 3}}}))
    with pytest.raises(ConfigError, match="needs a 'shards' input.*add a stage of type tokenize"):
        validate_config({"name": "p", "stages": {"pretrain": {}}})


def test_log_every_is_volatile_and_training_fields_are_not():
    base = PretrainConfig()
    fp = stage_fingerprint("1", base, {})
    assert stage_fingerprint("1", PretrainConfig(log_every=1), {}) == fp
    assert stage_fingerprint("1", PretrainConfig(train={"lr": 1e-3}), {}) != fp
    assert stage_fingerprint("1", PretrainConfig(deepspeed={"zero_stage": 3}), {}) != fp


def test_ds_config_cpu_and_gpu():
    train = TrainConfig(steps=10, micro_batch=4, grad_accum=3, warmup=2, clip=0.5)
    cpu = ds_config(train, DeepSpeedSpec(zero_stage=2), world_size=2, use_gpu=False)
    assert cpu["train_batch_size"] == 24 and cpu["gradient_accumulation_steps"] == 3
    assert cpu["gradient_clipping"] == 0.5 and cpu["zero_optimization"]["stage"] == 2
    assert not cpu["bf16"]["enabled"] and "optimizer" not in cpu  # torch AdamW is passed on CPU
    gpu = ds_config(train, DeepSpeedSpec(zero_stage=3, offload=True, extra={"zero_optimization": {
        "stage3_max_live_parameters": 123}, "bf16": {"enabled": False}}), world_size=8, use_gpu=True)
    z = gpu["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_max_live_parameters"] == 123 and z["stage"] == 3  # extra is deep-merged last
    assert gpu["bf16"] == {"enabled": False} and gpu["optimizer"]["type"] == "AdamW"
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    with pytest.raises(ValueError, match="offload"):
        DeepSpeedSpec(zero_stage=0, offload=True)


def test_lr_warms_up_then_decays_to_min_lr():
    train = TrainConfig(steps=12, warmup=4, lr=1.0, min_lr=0.1)
    lrs = [lr_at(train, s) for s in range(12)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    no_warmup = TrainConfig(steps=3, warmup=0, lr=1.0, min_lr=0.0)
    assert [lr_at(no_warmup, s) for s in range(3)] == pytest.approx([1.0, 0.5, 0.0])
