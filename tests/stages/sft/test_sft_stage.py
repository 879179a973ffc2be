"""The sft stage end to end: real local Ray (one per module), Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers,
real MLflow (SQLite), real transformers on the exported model; kill-and-resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sft_helpers import GENERATION_TEMPLATE, records, run_killed, stage_context, train_tokenizer, write_jsonl

from pipeline.errors import ConfigError
from pipeline.tracking import Tracker
from stages.sft.chat import to_messages
from stages.sft.config import SFTConfig
from stages.sft.data import SFTDataset

REPO = Path(__file__).resolve().parents[3]
STEPS, KILL_AT = 8, 4


@pytest.fixture(scope="module")
def ray_address():
    import ray

    from pipeline.ray_init import init_ray

    init_ray(None, 2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a (randomly initialised) base model exported as HF, and chat files with bad lines."""
    from stages.lm.hf import export_hf
    from stages.lm.model import CausalLM, ModelConfig

    root = tmp_path_factory.mktemp("sft-inputs")
    tok = train_tokenizer(root / "tok")
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                                 max_seq_len=256))
    export_hf(model, str(tok), str(root / "base"))
    train = records(160, seed=10)
    train[5:5] = ["{broken", {"messages": [{"role": "user", "content": "no answer"}]}]
    write_jsonl(root / "data" / "train.jsonl", train)
    write_jsonl(root / "data" / "val.jsonl", records(24, seed=11))
    return {"tok": tok, "base": root / "base", "train": root / "data" / "train.jsonl",
            "val": root / "data" / "val.jsonl"}


def _config(inputs: dict[str, Path]) -> dict:
    return {"data": str(inputs["train"]), "val": str(inputs["val"]), "max_len": 128, "packing": True,
            "init_from": str(inputs["base"]),
            "train": {"steps": STEPS, "micro_batch": 4, "lr": 1e-2, "min_lr": 1e-3, "warmup": 1},
            "scaling": {"num_workers": 2}, "checkpoint": {"every": KILL_AT, "keep": 2},
            "eval": {"every": KILL_AT, "batches": 2}, "log_every": 1}


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sft-test")
    return uri, client.create_run(exp).info.run_id


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_address, inputs, mlflow_run) -> Path:
    """One uninterrupted run, logged to MLflow."""
    from stages.sft.run import run

    out = tmp_path_factory.mktemp("ref") / "sft"
    tracker = Tracker(*mlflow_run)
    run(SFTConfig(**_config(inputs)), stage_context(out, ray_address, tracker))
    tracker.close()
    return out


def test_sft_beats_the_base_model_on_held_out_examples(reference, mlflow_run):
    from mlflow.tracking import MlflowClient

    stats = json.loads((reference / "stats.json").read_text())
    assert stats["steps"] == STEPS
    assert stats["eval_loss"] < stats["base_eval_loss"] - 0.5
    assert stats["data"]["train"]["quarantined"] == 2 and stats["data"]["train"]["examples"] == 160
    rejects = (reference / "rejects" / "train.jsonl").read_text().splitlines()
    assert [json.loads(r)["line"] for r in rejects] == [6, 7]
    client = MlflowClient(tracking_uri=mlflow_run[0])
    hist = {k: [(m.step, m.value) for m in client.get_metric_history(mlflow_run[1], k)]
            for k in ("base_eval_loss", "eval_loss", "loss")}
    assert hist["base_eval_loss"] == [(0, stats["base_eval_loss"])]
    evals = sorted(hist["eval_loss"])
    assert [s for s, _ in evals] == [0, KILL_AT, STEPS] and evals[0][1] == stats["base_eval_loss"]
    assert evals[-1][1] == pytest.approx(stats["eval_loss"]) and evals[-1][1] < evals[0][1]
    assert len(hist["loss"]) == STEPS


def test_exported_model_renders_chats_like_training(reference, inputs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = reference / "model"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    convs = [to_messages(r) for r in records(24, seed=11)]
    ds = SFTDataset(str(reference / "data" / "val.arrow"), 128, pad_id=1, split="val")
    trained = []
    for i in range(len(ds)):
        tokens, _, lengths = ds.row(i)
        trained += [tuple(t.tolist()) for t in np.split(tokens, np.cumsum(lengths)[:-1])]
    assert sorted(trained) == sorted(tuple(tok.apply_chat_template(c)["input_ids"]) for c in convs)
    assert tok.eos_token == "<|im_end|>"

    def hf_loss(path: Path) -> float:
        """Assistant-only loss on the held-out chats, all in transformers (its own mask and shift)."""
        model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        total = 0.0
        for c in convs:
            enc = tok.apply_chat_template(c, chat_template=GENERATION_TEMPLATE, return_dict=True,
                                          return_assistant_tokens_mask=True, return_tensors="pt")
            labels = enc["input_ids"].masked_fill(enc["assistant_masks"] == 0, -100)
            with torch.no_grad():
                total += float(model(input_ids=enc["input_ids"], labels=labels).loss)
        return total / len(convs)

    assert hf_loss(model_dir) < hf_loss(inputs["base"]) - 0.5


def test_killed_run_resumes_to_the_same_result(tmp_path, ray_address, inputs, reference):
    out = tmp_path / "sft"
    proc = run_killed(_config(inputs), out, ray_address, KILL_AT)
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert (out / "checkpoints" / f"step-{KILL_AT}" / "complete.json").is_file()
    assert not (out / "stats.json").exists() and not (out / "model").exists()

    from stages.sft.run import run

    run(SFTConfig(**_config(inputs)), stage_context(out, ray_address))
    assert (out / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    for name in ("model.safetensors", "tokenizer_config.json", "tokenizer.json"):
        assert (out / "model" / name).read_bytes() == (reference / "model" / name).read_bytes(), name
    for name in ("data/train.arrow", "data/val.arrow", "rejects/train.jsonl", "base_eval.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    stats, ref = (json.loads((d / "stats.json").read_text()) for d in (out, reference))
    assert stats.pop("model_dir") != ref.pop("model_dir") and stats == ref


def test_config_errors_name_the_field(inputs):
    from stages.sft.config import check

    with pytest.raises(ConfigError, match="init_from"):
        check(SFTConfig(data="x"), {"tokenizer": ["tokenize"]})
    with pytest.raises(ConfigError, match="remove stages.sft.init_from"):
        check(SFTConfig(data="x", init_from="m"), {"model": ["pretrain"]})
    check(SFTConfig(data="x", init_from="pretrain"), {"model": ["pretrain"]})  # names the instance: fine
    cfg = SFTConfig(data="x", train={"steps": 50})
    assert cfg.train.lr == 2e-5 and cfg.train.steps == 50  # a partial train block keeps the sft defaults
    with pytest.raises(ValueError, match="truncation"):
        SFTConfig(data="x", truncation="cut")


def test_model_and_tokenizer_sources(tmp_path, inputs):
    from pipeline.stage import handle
    from stages.sft.run import _sources

    tokenize = handle("tokenize", str(tmp_path / "tokenize"), "tokenizer")
    pretrain = handle("pretrain", str(tmp_path / "pretrain"), "model")
    ctx = stage_context(tmp_path / "sft", None)
    ctx.inputs = {"tokenizer": [tokenize], "model": [pretrain]}
    base = inputs["base"]
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "model").symlink_to(base)
    model, tok = _sources(SFTConfig(data="x"), ctx)
    assert (model, tok) == (str(tmp_path / "pretrain" / "model"), str(tmp_path / "tokenize" / "tokenizer"))
    ctx.inputs = {"tokenizer": [tokenize]}  # an init_from model brings its own tokenizer
    assert _sources(SFTConfig(data="x", init_from=str(base)), ctx) == (str(base), str(base))
    ctx.inputs = {}
    with pytest.raises(ConfigError, match="not a Hugging Face model directory"):
        _sources(SFTConfig(data="x", init_from=str(tmp_path)), ctx)
