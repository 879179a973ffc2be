"""The evaluate stage's config: validation errors name the key; it reads whichever model stages exist."""

from __future__ import annotations

import pytest

from pipeline.config import validate_config
from pipeline.errors import ConfigError
from pipeline.graph import order
from stages.evaluate.config import EvaluateConfig, check

BASE = {"name": "t", "stages": {"tokenize": {"input": "x.jsonl"}, "pretrain": {}}}


def _config(**stages):
    return validate_config({"name": "t", "stages": {**BASE["stages"], **stages}})


def test_evaluate_reads_tokenize_and_the_model_stages_present():
    nodes = {n.name: n for n in order(_config(evaluate={}))}
    assert nodes["evaluate"].inputs == ("tokenize", "pretrain")


def test_metric_and_task_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"stages\.evaluate\.registry\.metric: 'mc/acc' is not computed"):
        _config(evaluate={"registry": {"metric": "mc/acc"}})
    cfg = _config(evaluate={"tasks": [{"name": "mc", "path": "mc.jsonl", "num_fewshot": 1}],
                            "registry": {"metric": "mc/acc_norm", "mode": "max"}})
    assert cfg.stage_configs()["evaluate"].tasks[0].num_fewshot == 1
    with pytest.raises(ConfigError, match=r"stages\.evaluate\.tasks\.0\.num_fewshot"):
        _config(evaluate={"tasks": [{"name": "mc", "path": "mc.jsonl", "num_fewshot": -1}]})
    with pytest.raises(ConfigError, match=r"stages\.evaluate\.batch_sizes: unknown key"):
        _config(evaluate={"batch_sizes": 4})
    with pytest.raises(ConfigError, match=r"registry\.metric: 'pref_accuracy' is not computed"):
        _config(evaluate={"registry": {"metric": "pref_accuracy", "mode": "max"}})  # no dpo stage
    with pytest.raises(ValueError, match="unique"):
        EvaluateConfig(tasks=[{"name": "a", "path": "x"}, {"name": "a", "path": "y"}])


def test_evaluate_needs_a_model_and_preference_true_needs_dpo():
    with pytest.raises(ConfigError, match="needs a model"):
        check(EvaluateConfig(), {"data": ["tokenize"], "models": []})
    with pytest.raises(ConfigError, match=r"stages\.evaluate\.preference"):
        check(EvaluateConfig(preference=True), {"data": ["tokenize"], "models": ["pretrain"]})
    check(EvaluateConfig(preference="auto"), {"data": ["tokenize"], "models": ["pretrain"]})
    with pytest.raises(ConfigError, match=r"stages\.evaluate\.answer_loss: true needs an sft stage"):
        check(EvaluateConfig(answer_loss=True), {"data": ["tokenize"], "models": ["pretrain"]})


def test_answer_loss_reads_the_sft_val_split_and_can_be_the_registry_metric():
    cfg = _config(sft={"data": "chat.jsonl"}, evaluate={"registry": {"metric": "answer_loss"}})
    nodes = {n.name: n for n in order(cfg)}
    assert nodes["evaluate"].bound["answers"] == ("sft",)
    with pytest.raises(ConfigError, match=r"registry\.metric: 'answer_loss' is not computed"):
        _config(evaluate={"registry": {"metric": "answer_loss"}})  # no sft stage
    # an existing pipeline's evaluate keeps its fingerprint: the new keys at their defaults are left out
    from pipeline.fingerprint import result_fields

    assert "answer_loss" not in result_fields(EvaluateConfig())


def test_accuracies_carry_their_chance_level_and_sample_size():
    from stages.evaluate.multiple_choice import Example
    from stages.evaluate.report_md import baselines, metric_label, results_markdown

    two = Example("q", (" a", " b"), 0)
    four = Example("q", (" a", " b", " c", " d"), 1)
    base = baselines([("mc", [two, four, four])], pairs=10)
    assert base["mc/acc"] == {"chance": round((1 / 2 + 1 / 4 + 1 / 4) / 3, 4), "n": 3}
    assert base["pref_logp_accuracy"] == {"chance": 0.5, "n": 10}
    assert metric_label("mc/acc_norm", base) == "mc/acc_norm ↑ (chance 0.33, n 3)"
    assert metric_label("perplexity", base) == "perplexity ↓"
    md = results_markdown({"a": {"mc/acc": 0.5}, "b": {"mc/acc": 0.7}}, {}, None, base)
    assert "| mc/acc ↑ (chance 0.33, n 3) | 0.5000 | **0.7000** |" in md


def test_without_a_metric_the_registry_takes_the_last_model_of_the_chain():
    from stages.evaluate.config import RegistryConfig
    from stages.evaluate.registry import best_model

    models = {"pretrain": {"perplexity": 17.0}, "sft": {"perplexity": 113.0}, "dpo": {"perplexity": 117.0}}
    assert best_model(models, RegistryConfig()) == ("dpo", None)
    assert best_model(models, RegistryConfig(metric="perplexity")) == ("pretrain", 17.0)
