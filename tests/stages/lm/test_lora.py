"""LoRA on Seedline's model without Ray: the saved adapter loads with real peft on the exported base under
real transformers with the merged model's logits; adapters disabled compute the base exactly; only the
adapters train; config errors name the key; an absent ``lora`` leaves fingerprints unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import validate_config
from pipeline.errors import ConfigError
from pipeline.fingerprint import result_fields
from stages.lm.hf import export_hf, import_hf
from stages.lm.lora import adapters_disabled, apply_lora, merge_lora, save_adapter, trainable_summary
from stages.lm.lora_config import LoraSpec, check_lora_model
from stages.lm.model import CausalLM, ModelConfig
from stages.sft.config import SFTConfig

CFG = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)


def _trained(spec: LoraSpec, tie: bool = False) -> CausalLM:
    """A base model with adapters whose B (and saved modules) look trained: random, not zero."""
    torch.manual_seed(0)
    model = apply_lora(CausalLM(CFG.model_copy(update={"tie_embeddings": tie})), spec)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _peft_logits(base_dir: str, adapter_dir: str, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("spec", [
    LoraSpec(rank=4, alpha=8, targets="all-linear"),
    LoraSpec(rank=3, alpha=5, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    LoraSpec(rank=2, alpha=2, targets=["k_proj", "up_proj", "down_proj"], modules_to_save=["embed_tokens"]),
], ids=["all-linear", "q-v-lm_head", "k-up-down-embed"])
def test_peft_loads_the_adapter_on_the_exported_base_with_the_merged_logits(tmp_path, spec):
    torch.manual_seed(0)
    export_hf(CausalLM(CFG), None, str(tmp_path / "base"))  # the base: what _trained starts from
    model = _trained(spec).eval()
    save_adapter(model, spec, str(tmp_path / "base"), str(tmp_path / "adapter"))
    ids = torch.randint(0, CFG.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = model(ids).logits
    merge_lora(model)
    export_hf(model, None, str(tmp_path / "merged"))
    merged = import_hf(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        seedline = merged(ids).logits
    peft = _peft_logits(str(tmp_path / "base"), str(tmp_path / "adapter"), ids)
    assert (peft - seedline).abs().max() <= 1e-4
    assert (unmerged - seedline).abs().max() <= 1e-4
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == spec.rank and config["lora_alpha"] == spec.alpha
    assert sorted(config["target_modules"]) == sorted(spec.target_names())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")


def test_disabled_adapters_compute_the_base_exactly_and_only_adapters_train():
    spec = LoraSpec(rank=4, alpha=16, dropout=0.1, targets=["q_proj", "v_proj", "gate_proj", "down_proj"])
    torch.manual_seed(0)
    plain = CausalLM(CFG)
    torch.manual_seed(0)
    model = apply_lora(CausalLM(CFG), spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".adapters." in k for k in changed)
    assert {k for k in changed if k.endswith("lora_B.weight")}  # B left zero
    model.eval()
    with torch.no_grad(), adapters_disabled(model):
        assert torch.equal(model(ids).logits, plain.eval()(ids).logits)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, plain(ids).logits)
    counts = trainable_summary(model)
    per_layer = 4 * (32 + 32) + 4 * (32 + 16) + 4 * (32 + 48) + 4 * (48 + 32)  # r * (in + out) per slice
    assert counts["trainable_params"] == 2 * per_layer
    assert counts["trainable_share"] == pytest.approx(2 * per_layer / counts["total_params"])


def test_bad_lora_settings_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\.sft\.lora\.targets.*no module named 'qkv'"):
        validate_config({"name": "t", "workdir": str(tmp_path),
                         "stages": {"sft": {"data": "x", "init_from": "m", "lora": {"targets": ["qkv"]}}}})
    with pytest.raises(ConfigError, match=r"stages\.dpo\.lora.*rank"):
        validate_config({"name": "t", "workdir": str(tmp_path),
                         "stages": {"dpo": {"data": "x", "init_from": "m", "lora": {"rank": 0}}}})
    with pytest.raises(ConfigError, match="set reference: precompute"):
        validate_config({"name": "t", "workdir": str(tmp_path), "stages": {"dpo": {
            "data": "x", "init_from": "m", "lora": {"modules_to_save": ["lm_head"]}}}})
    export_hf(CausalLM(CFG.model_copy(update={"tie_embeddings": True})), None, str(tmp_path / "tied"))
    with pytest.raises(ConfigError, match=r"stages\.sft\.lora\.modules_to_save: .* ties"):
        check_lora_model(LoraSpec(modules_to_save=["lm_head"]), str(tmp_path / "tied"), "sft")


def test_lora_absent_leaves_the_fingerprint_fields_unchanged():
    from stages.dpo.config import DPOConfig

    for config in (SFTConfig(data="x"), DPOConfig(data="x")):
        assert "lora" not in result_fields(config)
    assert DPOConfig(data="x").reference == "precompute"
    lora = DPOConfig(data="x", lora={"rank": 8})
    assert lora.reference == "in_memory" and result_fields(lora)["lora"]["rank"] == 8
    assert DPOConfig(data="x", lora={}, reference="precompute").reference == "precompute"
