"""sft with LoRA end to end: real Ray Train workers (2 CPU, gloo), real DeepSpeed, real peft and transformers
on the outputs; kill-and-resume; ZeRO-3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import test_sft_stage
import torch
from safetensors.torch import load_file
from sft_helpers import run_killed, stage_context
from test_sft_stage import KILL_AT, STEPS

from pipeline.errors import SeedlineError
from stages.sft.config import SFTConfig

pytestmark = pytest.mark.slow

ray_address = test_sft_stage.ray_address  # the same module-scoped fixtures: one local Ray per test module
inputs = test_sft_stage.inputs
LORA = {"rank": 8, "alpha": 16, "dropout": 0.05, "targets": "all-linear"}


def _config(inputs: dict[str, Path], **changes) -> dict:
    cfg = test_sft_stage._config(inputs)
    cfg["train"] |= {"lr": 2e-2, "min_lr": 2e-3}
    return cfg | {"lora": LORA} | changes


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, ray_address, inputs) -> Path:
    from stages.sft.run import run

    out = tmp_path_factory.mktemp("lora") / "sft"
    run(SFTConfig(**_config(inputs)), stage_context(out, ray_address))
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_lora_sft_beats_the_base_and_records_what_it_trained(lora_run):
    stats = json.loads((lora_run / "stats.json").read_text())
    assert stats["steps"] == STEPS and stats["eval_loss"] < stats["base_eval_loss"] - 0.15
    lora = stats["lora"]
    assert 0 < lora["trainable_params"] < lora["total_params"] and lora["trainable_share"] < 0.3
    assert lora["trainable_share"] == pytest.approx(lora["trainable_params"] / lora["total_params"])
    assert lora["peak_memory_mb"] > 0 and lora["adapter_dir"] == str(lora_run / "adapter")
    assert sorted(p.name for p in (lora_run / "adapter").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]


def test_peft_adapter_on_the_base_matches_the_merged_model_and_only_adapters_changed(lora_run, inputs):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = load_file(str(inputs["base"] / "model.safetensors"))
    merged = load_file(str(lora_run / "model" / "model.safetensors"))
    adapted = {k for k in base if k.endswith("_proj.weight")}
    assert {k for k in base if not torch.equal(base[k], merged[k])} == adapted  # norms, embeddings: frozen
    # the checkpoint holds the adapters only (and no frozen weight)
    from stages.lm.safe_load import safe_torch_load

    ckpt = safe_torch_load(lora_run / "checkpoints" / f"step-{STEPS}" / "mp_rank_00_model_states.pt")
    assert ckpt["module"] and all(".adapters." in k for k in ckpt["module"])
    marker = json.loads((lora_run / "checkpoints" / f"step-{STEPS}" / "complete.json").read_text())
    from stages.lm.lora import base_fingerprint

    assert marker["lora_base"] == base_fingerprint(str(inputs["base"]))

    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    hf_base = LlamaForCausalLM.from_pretrained(str(inputs["base"]), dtype=torch.float32)
    peft = _logits(PeftModel.from_pretrained(hf_base, str(lora_run / "adapter")), ids)
    seedline = _logits(LlamaForCausalLM.from_pretrained(str(lora_run / "model"), dtype=torch.float32), ids)
    assert (peft - seedline).abs().max() <= 1e-4


def test_killed_lora_run_resumes_to_the_same_bytes(tmp_path, ray_address, inputs, lora_run):
    out = tmp_path / "sft"
    proc = run_killed(_config(inputs), out, ray_address, KILL_AT)
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert (out / "checkpoints" / f"step-{KILL_AT}" / "complete.json").is_file()
    assert not (out / "adapter").exists() and not (out / "model").exists()

    from stages.sft.run import run

    run(SFTConfig(**_config(inputs)), stage_context(out, ray_address))
    for name in ("metrics.jsonl", "model/model.safetensors", "adapter/adapter_model.safetensors"):
        assert (out / name).read_bytes() == (lora_run / name).read_bytes(), name
    stats, ref = (json.loads((d / "stats.json").read_text()) for d in (out, lora_run))
    for s in (stats, ref):
        del s["model_dir"], s["lora"]["adapter_dir"], s["lora"]["peak_memory_mb"]
    assert stats == ref


def test_resume_refuses_checkpoints_of_another_base(tmp_path, ray_address, inputs, lora_run):
    out = tmp_path / "sft"
    shutil.copytree(lora_run, out)
    shutil.rmtree(out / "model")
    (out / "stats.json").unlink()
    marker = out / "checkpoints" / f"step-{STEPS}" / "complete.json"
    marker.write_text(json.dumps(json.loads(marker.read_text()) | {"lora_base": "another"}))
    from stages.sft.run import run

    with pytest.raises(SeedlineError, match=f"step-{STEPS} was trained on another base model"):
        run(SFTConfig(**_config(inputs)), stage_context(out, ray_address))


@pytest.mark.parametrize("zero_stage", [0, 1, 3])
def test_lora_trains_like_zero2_under_every_zero_stage(zero_stage, tmp_path, ray_address, inputs, lora_run):
    from stages.sft.run import run

    out = tmp_path / "sft"
    cfg = _config(inputs, deepspeed={"zero_stage": zero_stage},
                  train=_config(inputs)["train"] | {"steps": KILL_AT},
                  checkpoint={"every": KILL_AT, "keep": 1})
    run(SFTConfig(**cfg), stage_context(out, ray_address))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (lora_run / "metrics.jsonl").read_text().splitlines()]
    # the schedules part after step 2 (cosine over 4 steps here, 8 there): the same first two updates
    losses, ref_losses = ([r["loss"] for r in rs if "loss" in r][:2] for rs in (rows, ref))
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
