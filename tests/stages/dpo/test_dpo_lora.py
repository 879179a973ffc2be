"""dpo with LoRA on 2 real Ray Train workers (CPU, gloo, real DeepSpeed): the reference "base with adapters
disabled" (killed and resumed) ends with the bytes of the precomputed-reference run; sft with LoRA then dpo
with LoRA on the merged sft model runs as one pipeline and its adapter loads with real peft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_dpo_stage
import torch
from test_dpo_stage import REPO, _ctx

from pipeline.config import validate_config
from pipeline.runner import run_pipeline
from pipeline.stage import handle
from stages.dpo.config import DPOConfig

pytestmark = pytest.mark.slow

ray_address = test_dpo_stage.ray_address  # the same module-scoped fixture: one local Ray per test module
LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj", "o_proj", "down_proj"]}


def _config(assets, **changes) -> dict:
    cfg = test_dpo_stage._config(assets, lora=LORA, **changes)
    cfg["train"] |= {"lr": 1e-2, "min_lr": 1e-3}
    return cfg


@pytest.fixture(scope="module")
def precomputed(dpo_assets, tmp_path_factory, ray_address) -> Path:
    from stages.dpo.run import run

    out = tmp_path_factory.mktemp("dpo-lora") / "dpo"
    run(DPOConfig(**_config(dpo_assets, reference="precompute")), _ctx(out, ray_address))
    return out


def test_disabled_adapter_reference_killed_and_resumed_equals_the_precomputed_reference(
        dpo_assets, precomputed, ray_address, tmp_path):
    out = tmp_path / "dpo"
    cfg = _config(dpo_assets)
    assert DPOConfig(**cfg).reference == "in_memory"  # LoRA's default: the base with adapters disabled
    script = ("import json, sys; from pathlib import Path\n"
              "from stages.dpo.config import DPOConfig; from stages.dpo.run import run\n"
              "from test_dpo_stage import _ctx\n"
              "run(DPOConfig(**json.loads(sys.argv[2])), _ctx(Path(sys.argv[1]), sys.argv[3]))\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "SEEDLINE_TRAIN_KILL_AT_STEP": "2",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, str(out), json.dumps(cfg), ray_address], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert (out / "checkpoints" / "step-2" / "complete.json").is_file()
    assert not (out / "reference" / "train").exists()  # no reference pass over the training pairs

    from stages.dpo.run import run

    run(DPOConfig(**cfg), _ctx(out, ray_address))
    for name in ("metrics.jsonl", "model/model.safetensors", "adapter/adapter_model.safetensors",
                 "policy_logps/val/part-00000.npy"):
        assert (out / name).read_bytes() == (precomputed / name).read_bytes(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # B = 0: policy = reference
    assert any(r.get("rewards/margins", 0) > 0 for r in rows[1:])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["lora"]["trainable_share"] < 0.2 and stats["lora"]["peak_memory_mb"] > 0


def test_sft_lora_then_dpo_lora_on_the_merged_sft_model(dpo_assets, tmp_path, ray_address):
    from conftest import make_records, write_jsonl
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    pairs = [r for r in make_records(80, seed=3) if isinstance(r["prompt"], str)]
    chats = write_jsonl(tmp_path / "chats.jsonl",
                        [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs])
    sft = {"data": str(chats), "val_fraction": 0.2, "max_len": 96, "init_from": dpo_assets.model_dir,
           "train": {"steps": 2, "micro_batch": 4, "lr": 1e-2, "min_lr": 1e-3, "warmup": 1},
           "checkpoint": {"every": 2}, "eval": {"batches": 1}, "lora": LORA}
    dpo = test_dpo_stage._config(dpo_assets, lora=LORA)
    del dpo["init_from"]  # from the sft stage's merged model/
    dpo["train"] |= {"steps": 2}
    cfg = validate_config({"name": "chain", "workdir": str(tmp_path / "runs"), "tracking": {"enabled": False},
                           "stages": {"sft": sft, "dpo": dpo}})
    res = run_pipeline(cfg)
    sft_out, dpo_out = Path(res.stage_dirs["sft"]), Path(res.stage_dirs["dpo"])
    # adapter/ is a typed output of both stages: a consumer gets it as a handle
    sft_adapter = handle("sft", str(sft_out), "adapter").path
    dpo_adapter = handle("dpo", str(dpo_out), "adapter").path
    assert Path(sft_adapter, "adapter_model.safetensors").is_file()
    adapter = json.loads(Path(dpo_adapter, "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(sft_out / "model")
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = LlamaForCausalLM.from_pretrained(str(sft_out / "model"), dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, dpo_adapter).eval()(input_ids=ids).logits
        merged = LlamaForCausalLM.from_pretrained(str(dpo_out / "model"), dtype=torch.float32).eval()
        assert (peft - merged(input_ids=ids).logits).abs().max() <= 1e-4
