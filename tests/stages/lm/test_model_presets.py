"""Presets, config overrides, parameter counts, FLOPs per token and MFU."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from stages.lm.flops import flops_per_token, mfu, param_count, peak_flops
from stages.lm.model import CausalLM
from stages.lm.presets import PRESETS, ModelSpec, resolve_model_config


def test_presets_have_their_advertised_sizes():
    sizes = {name: param_count(resolve_model_config(name, {}, 32000, 2048)) for name in PRESETS}
    assert 120e6 < sizes["125m"] < 140e6
    assert 330e6 < sizes["350m"] < 380e6
    assert 1.0e9 < sizes["1b"] < 1.2e9
    llama3 = resolve_model_config("llama3-8b", {}, 128256, 8192)
    assert (llama3.hidden_dim, llama3.kv_heads, llama3.rope_theta) == (14336, 8, 500000.0)
    assert 8.0e9 < param_count(llama3) < 8.1e9  # Llama-3-8B has 8.03B parameters
    assert sizes["tiny"] < 5e6


def test_overrides_apply_field_by_field_and_bad_ones_are_config_errors():
    cfg = resolve_model_config("125m", {"n_layers": 3, "rope_theta": 5e5}, vocab_size=1000, max_seq_len=256)
    assert (cfg.n_layers, cfg.rope_theta, cfg.dim) == (3, 5e5, 768)
    assert (cfg.vocab_size, cfg.max_seq_len) == (1000, 256)
    assert resolve_model_config("tiny", {"vocab_size": 1024}, 1000, 256).vocab_size == 1024  # padding is fine
    with pytest.raises(ConfigError, match="below the data"):
        resolve_model_config("tiny", {"vocab_size": 999}, 1000, 256)
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_model_config("huge", {}, 1000, 256)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        resolve_model_config("tiny", {"n_kv_heads": 3}, 1000, 256)
    spec = ModelSpec(preset="350m", overrides={"n_layers": 2})
    assert spec.resolve(500, 128).n_layers == 2
    with pytest.raises(ValueError, match="unknown model fields"):
        ModelSpec(preset="tiny", overrides={"layers": 2})
    with pytest.raises(ValueError, match="unknown preset"):
        ModelSpec(preset="nope")


@pytest.mark.parametrize("tied", [False, True])
def test_param_count_matches_the_model(tied):
    cfg = resolve_model_config("tiny", {"tie_embeddings": tied, "n_layers": 2}, 300, 64)
    model = CausalLM(cfg)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    assert param_count(cfg, embeddings=False) == param_count(cfg) - 300 * cfg.dim


def test_flops_per_token_and_mfu():
    cfg = resolve_model_config("1b", {}, 32000, 2048)
    n = param_count(cfg, embeddings=False)  # untied: output projection counted, embedding lookup not
    assert flops_per_token(cfg, 2048) == 6 * n + 12 * 22 * 32 * 64 * 2048
    tied = resolve_model_config("1b", {"tie_embeddings": True}, 32000, 2048)
    assert flops_per_token(tied, 2048) == flops_per_token(cfg, 2048)  # the head matmul still happens
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops(None) is None and peak_flops("cpu") is None
    assert mfu(10_000, 6e9, 989e12) == pytest.approx(10_000 * 6e9 / 989e12)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)
