"""The dpo stage's config: validated at the edge with the key path, torch-free registration."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.config import validate_config
from pipeline.errors import ConfigError


def _validate(dpo: dict, **stages) -> None:
    validate_config({"name": "t", "workdir": "/tmp/seedline-dpo-config", "stages": {**stages, "dpo": dpo}})


@pytest.mark.parametrize(("dpo", "where", "message"), [
    ({"data": "x.jsonl"}, "stages.dpo.init_from", "required when the pipeline has no sft stage"),
    ({"data": "x.jsonl", "init_from": "m", "max_len": 64, "max_prompt_len": 64}, "stages.dpo",
     "max_prompt_len (64) must be below max_len (64)"),
    ({"data": "x.jsonl", "init_from": "m", "loss_type": "hinge", "label_smoothing": 0.1}, "stages.dpo",
     "label_smoothing applies to the sigmoid loss only"),
    ({"data": "x.jsonl", "init_from": "m", "reference": "disk"}, "stages.dpo.reference", ""),
    ({"data": "x.jsonl", "init_from": "m", "beta": 0}, "stages.dpo.beta", ""),
    ({"data": "x.jsonl", "init_from": "m", "betta": 0.1}, "stages.dpo.betta", ""),
])
def test_bad_configs_name_the_key(dpo, where, message):
    with pytest.raises(ConfigError) as e:
        _validate(dpo)
    assert e.value.path == where and message in str(e.value)


def test_sft_and_init_from_exclude_each_other():
    sft = {"data": "i.jsonl", "init_from": "m"}
    _validate({"data": "x.jsonl"}, sft=sft)
    with pytest.raises(ConfigError, match="the pipeline has the sft stage"):
        _validate({"data": "x.jsonl", "init_from": "m"}, sft=sft)


def test_registration_imports_neither_torch_nor_ray():
    code = "import sys, stages.dpo; print('torch' in sys.modules or 'ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
