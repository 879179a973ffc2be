"""Every recipe in configs/ validates as a user's file would (key paths, stage defaults, bindings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.graph import order

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_validates_and_binds(path):
    cfg = load_config(path)
    nodes = order(cfg)
    assert nodes and all(len(n.fingerprint) == 10 for n in nodes)


def test_gpu_recipe_trains_the_1b_preset_in_bf16_on_8_gpus():
    from stages.lm.flops import param_count

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "gpu.yaml")
    pretrain = cfg.stage_configs()["pretrain"]
    assert pretrain.scaling.use_gpu and pretrain.scaling.num_workers == 8
    model = pretrain.model.resolve(32000, 2048)
    assert 1.0e9 < param_count(model) < 1.2e9
    tokens_per_step = 8 * pretrain.train.micro_batch * pretrain.train.grad_accum * 2048
    assert tokens_per_step == 2**20
