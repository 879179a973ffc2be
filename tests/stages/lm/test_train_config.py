"""Training stage configs: a partial block keeps the stage's own defaults for the keys it does not set,
at every nesting level, and what will run is what `run.json` and `seedline plan` show (torch-free)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from pipeline.config import resolved, validate_config
from pipeline.fingerprint import stage_fingerprint
from pipeline.stage import StrictModel, get
from stages.dpo.config import DPOConfig
from stages.lm.train_config import TrainingStageConfig
from stages.pretrain.config import PretrainConfig
from stages.sft.config import SFTConfig

REPO = Path(__file__).resolve().parents[3]
SECTIONS = ("train", "scaling", "deepspeed", "checkpoint", "eval")
REQUIRED = {PretrainConfig: {}, SFTConfig: {"data": "x.jsonl"}, DPOConfig: {"data": "x.jsonl"}}
# One key per section set to a value no stage uses as its default.
CHANGE = {"train": ("steps", 123), "scaling": ("num_workers", 3), "deepspeed": ("zero_stage", 1),
          "checkpoint": ("keep", 5), "eval": ("batches", 3)}


def _stage_default(model: type[BaseModel], section: str) -> dict:
    return model.model_fields[section].get_default(call_default_factory=True).model_dump()


@pytest.mark.parametrize("model", list(REQUIRED), ids=lambda m: m.__name__)
@pytest.mark.parametrize("section", SECTIONS)
def test_partial_block_keeps_the_stage_defaults(model, section):
    key, value = CHANGE[section]
    cfg = model.model_validate({**REQUIRED[model], section: {key: value}})
    got = getattr(cfg, section).model_dump()
    want = _stage_default(model, section) | {key: value}
    assert got == want
    assert issubclass(model, TrainingStageConfig)


def test_the_reported_cases():
    dpo = DPOConfig.model_validate({"data": "x", "train": {"steps": 200}}).train
    assert (dpo.steps, dpo.lr, dpo.weight_decay, dpo.warmup, dpo.micro_batch) == (200, 1e-6, 0.0, 10, 4)
    pre = PretrainConfig.model_validate({"eval": {"batches": 4}}).eval
    assert (pre.every, pre.batches) == (200, 4)
    sft = SFTConfig.model_validate({"data": "x", "train": {"steps": 50, "warmup": 5}}).train
    assert (sft.steps, sft.lr, sft.min_lr, sft.weight_decay, sft.warmup) == (50, 2e-5, 2e-6, 0.0, 5)
    dpo_eval = DPOConfig.model_validate({"data": "x", "eval": {"every": 7}}).eval
    assert (dpo_eval.every, dpo_eval.batches) == (7, 16)


def test_merge_at_every_nesting_level():
    class Inner(StrictModel):
        a: int = 1
        b: int = 2

    class Middle(StrictModel):
        inner: Inner = Inner(a=10)
        c: int = 3

    class Outer(StrictModel):
        middle: Middle = Middle(inner=Inner(b=20), c=30)

    got = Outer.model_validate({"middle": {"inner": {"a": 5}}}).middle
    assert (got.inner.a, got.inner.b, got.c) == (5, 20, 30)
    got = Outer.model_validate({"middle": {"c": 0}}).middle
    assert (got.inner.a, got.inner.b, got.c) == (1, 20, 0)  # Outer's declared inner wins over Middle's


def test_alternatives_replace_the_default_block():
    from stages.tokenize.config import TokenizeConfig

    cfg = TokenizeConfig.model_validate({"input": "x", "tokenizer": {"path": "tok.json"}})
    assert cfg.tokenizer.path == "tok.json" and cfg.tokenizer.train is None


def test_other_stages_keep_nested_defaults():
    evaluate, tokenize = get("evaluate").config_model, get("tokenize").config_model
    ev = evaluate.model_validate({"registry": {"name": "m"}, "perplexity": {"batches": 2}})
    assert (ev.registry.name, ev.registry.alias, ev.registry.metric) == ("m", "candidate", None)
    assert (ev.perplexity.batches, ev.perplexity.enabled, ev.perplexity.doc_mask) == (2, True, True)
    tok = tokenize.model_validate({"input": "x", "tokenizer": {"train": {"vocab_size": 999}}})
    assert (tok.tokenizer.train.vocab_size, tok.tokenizer.train.min_frequency) == (999, 2)


def _pipeline(dpo_train: dict) -> dict:
    return {"name": "p", "stages": {"tokenize": {"input": "x/*.jsonl"},
                                    "dpo": {"data": "p.jsonl", "init_from": "m", "train": dpo_train}}}


def test_run_json_records_the_merged_values_and_the_fingerprint_follows_them():
    cfg = validate_config(_pipeline({"steps": 200}))
    recorded = resolved(cfg)["stages"]["dpo"]["train"]
    assert recorded["lr"] == 1e-6 and recorded["warmup"] == 10 and recorded["steps"] == 200
    spec = get("dpo")
    fp_partial = stage_fingerprint(spec.version, cfg.stage_configs()["dpo"], {})
    explicit = validate_config(_pipeline({"steps": 200, "lr": 1e-6, "warmup": 10, "micro_batch": 4}))
    assert stage_fingerprint(spec.version, explicit.stage_configs()["dpo"], {}) == fp_partial
    # The values the partial block resolved to before this fix (pretrain's) are another config.
    old = validate_config(_pipeline({"steps": 200, "lr": 3e-4, "warmup": 100, "micro_batch": 8,
                                     "weight_decay": 0.1, "min_lr": 3e-5}))
    assert stage_fingerprint(spec.version, old.stage_configs()["dpo"], {}) != fp_partial


def test_plan_shows_the_resolved_config(tmp_path):
    path = tmp_path / "p.yaml"
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    data = _pipeline({"steps": 200}) | {"workdir": str(tmp_path / "runs")}
    data["stages"]["tokenize"]["input"] = str(tmp_path / "x" / "*.jsonl")
    data["stages"]["dpo"] |= {"data": str(tmp_path / "p.jsonl"), "init_from": str(tmp_path / "m")}
    path.write_text(yaml.safe_dump(data))
    out = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(path), "--show-config"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout[out.stdout.index("stages:"):])
    assert shown["stages"]["dpo"]["train"] | {} == resolved(validate_config(data))["stages"]["dpo"]["train"]
    assert shown["stages"]["dpo"]["train"]["lr"] == 1e-6


def test_fit_reads_no_config_by_duck_typing():
    src = (REPO / "stages/lm/trainer.py").read_text() + (REPO / "stages/lm/train_worker.py").read_text()
    assert "getattr(cfg" not in src


def _pretrain(scaling: dict, train: dict | None = None) -> dict:
    return {"name": "p", "stages": {"tokenize": {"input": "x/*.jsonl"},
                                    "pretrain": {"scaling": scaling, "train": train or {}}}}


def test_elastic_worker_range_keeps_the_fingerprint_of_its_maximum():
    """The global batch is sized for ``max`` workers, so a fixed 2 and an elastic 1-2 are one result: a
    run switched to elastic resumes the same stored stage."""
    spec = get("pretrain")

    def fp(scaling: dict) -> str:
        stage = validate_config(_pretrain(scaling)).stage_configs()["pretrain"]
        return stage_fingerprint(spec.version, stage, {})

    assert fp({"num_workers": {"min": 1, "max": 2}}) == fp({"num_workers": 2}) != fp({"num_workers": 4})
    cfg = validate_config(_pretrain({"num_workers": {"min": 1, "max": 2}}))
    assert cfg.stage_configs()["pretrain"].scaling.ray_num_workers() == (1, 2)
    assert resolved(cfg)["stages"]["pretrain"]["scaling"]["num_workers"] == {"min": 1, "max": 2}


@pytest.mark.parametrize(("scaling", "train", "path", "message"), [
    ({"num_workers": {"min": 2, "max": 3}}, {}, "stages.pretrain.scaling.num_workers",
     "cannot be split over 2 workers"),
    ({"num_workers": {"min": 3, "max": 2}}, {}, "stages.pretrain.scaling.num_workers", "must not exceed max"),
    ({"num_workers": {"min": 1}}, {}, "stages.pretrain.scaling.num_workers.max", "required key is missing"),
    ({"num_workers": 0}, {}, "stages.pretrain.scaling.num_workers", "must be > 0"),
])
def test_bad_worker_counts_name_the_key(scaling, train, path, message):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        validate_config(_pretrain(scaling, train))
    assert e.value.path == path and message in e.value.message


def test_elastic_range_with_enough_accumulation_is_accepted():
    cfg = validate_config(_pretrain({"num_workers": {"min": 2, "max": 3}}, {"grad_accum": 2}))
    assert cfg.stage_configs()["pretrain"].scaling.min_workers == 2  # 2 x 3 rows split over 2 or 3 workers
