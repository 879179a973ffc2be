"""pretrain on a weighted mixture of two tokenize instances (real text: package docs and the standard
library's Python sources), on 2 real Ray Train workers: one shared tokenizer, tokens per source in
metrics.jsonl and MLflow, new weights re-tokenize nothing, sources with different tokenizers refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.real_text import doc_texts, python_sources
from pipeline.config import validate_config
from pipeline.errors import ConfigError
from pipeline.report import write_report
from pipeline.runner import run_pipeline
from stages.lm.presets import ModelSpec
from stages.pretrain.report_section import _trained, funnel
from stages.pretrain.task import PretrainTask

REPO = Path(__file__).resolve().parents[3]
MODEL = {"preset": "tiny",
         "overrides": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64}}


def _jsonl(path: Path, texts: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t[:4000]}) + "\n"
                            for i, t in enumerate(texts)))
    return str(path)


def _config(root: Path, weights: dict[str, float], code_docs: int = 60, code_chars: int = 4000) -> dict:
    docs = _jsonl(root / "docs.jsonl", doc_texts(120))
    code = _jsonl(root / "code.jsonl", [t[:code_chars] for t in python_sources(code_docs)])
    tok = {"seq_len": 32, "val_fraction": 0.05}
    return {"name": "mix", "workdir": str(root / "runs"), "stages": {
        "docs": {"type": "tokenize", "input": docs,
                 "tokenizer": {"train": {"vocab_size": 320, "sample_docs": 200}}, **tok},
        "code": {"type": "tokenize", "input": code, "inputs": {"tokenizer": "docs"}, **tok},
        "pretrain": {"data": weights, "model": MODEL, "scaling": {"num_workers": 2},
                     "train": {"steps": 4, "micro_batch": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup": 1},
                     "checkpoint": {"every": 2}, "eval": {"every": 2, "batches": 1}, "log_every": 1}}}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, object, object]:
    """(root, config, result) of the uninterrupted docs 0.7 / code 0.3 run through the pipeline runner."""
    root = tmp_path_factory.mktemp("mix")
    cfg = validate_config(_config(root, {"docs": 0.7, "code": 0.3}))
    return root, cfg, run_pipeline(cfg)


@pytest.mark.slow
def test_mixture_trains_on_both_sources_and_new_weights_retokenize_nothing(straight):
    from mlflow.tracking import MlflowClient

    tmp_path, cfg, res = straight
    docs, code, out = (Path(res.stage_dirs[n]) for n in ("docs", "code", "pretrain"))
    m_docs, m_code = (json.loads((d / "manifest.json").read_text()) for d in (docs, code))
    assert m_docs["tokenizer_sha256"] == m_code["tokenizer_sha256"]  # code reuses the docs tokenizer
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    last = train[-1]
    assert last["tokens/docs"] > last["tokens/code"] > 0
    assert last["tokens/docs"] + last["tokens/code"] == last["tokens"] == 4 * 4 * 2 * 32
    assert 0 < last["epochs/code"] < 1
    run_id = json.loads((out / "status.json").read_text())["mlflow_run_id"]
    history = MlflowClient(cfg.tracking_uri()).get_metric_history(run_id, "tokens/code")
    assert [m.value for m in history] == [r["tokens/code"] for r in train]
    # the report's funnel follows each source's chain and ends at the tokens trained on
    run = json.loads((Path(res.run_dir) / "run.json").read_text())
    assert run["inputs"]["pretrain"]["data"] == ["docs", "code"]
    assert run["inputs"]["code"]["tokenizer"] == ["docs"]
    html = Path(write_report(res.run_dir)).read_text()
    assert "Data funnel by source: pretrain" in html and "source code" in html
    both = ["docs", "code"]
    rows = {r[0]: r[1:] for r in funnel(both, res.stage_dirs, run["inputs"], _trained(str(out), both))}
    assert rows["tokens trained on"] == [last["tokens/docs"], last["tokens/code"]]
    stats = [json.loads((d / "stats.json").read_text()) for d in (docs, code)]
    assert rows["documents in"] == [s["docs_in"] for s in stats]
    assert rows["tokens out (train split)"] == [s["tokens_train"] for s in stats]

    again = run_pipeline(validate_config(_config(tmp_path, {"docs": 0.5, "code": 0.5})))
    assert again.outcomes["docs"] != "ran" and again.outcomes["code"] != "ran"
    assert again.outcomes["pretrain"] == "ran" and again.stage_dirs["pretrain"] != str(out)

    # A source tokenized with a tokenizer of its own cannot join the mixture.
    own = _config(tmp_path, {"docs": 1.0})
    del own["stages"]["code"]["inputs"]
    own["stages"]["code"]["tokenizer"] = {"train": {"vocab_size": 300, "sample_docs": 50}}
    del own["stages"]["pretrain"]
    other = Path(run_pipeline(validate_config(own)).stage_dirs["code"])
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.data\.code.*inputs: \{tokenizer: docs\}"):
        PretrainTask({"docs": str(docs), "code": str(other)}, ModelSpec(**MODEL),
                     weights={"docs": 1, "code": 1})


KILLED = r"""
import json, logging, sys
from pathlib import Path
from pipeline.stage import Progress, StageContext, handle
from pipeline.tracking import NullTracker
from stages.pretrain.config import PretrainConfig
from stages.pretrain.run import run
out, sources, cfg = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
data = [handle("tokenize", d, "shards", instance=name) for name, d in sources.items()]
ctx = StageContext(name="pretrain", out_dir=out, run_dir=str(Path(out).parent), fingerprint="test",
                   inputs={"data": data}, tracker=NullTracker(), progress=Progress(None),
                   logger=logging.getLogger("test"), ray_address=sys.argv[4])
run(PretrainConfig(**cfg), ctx)
print("NOT KILLED")
"""


@pytest.mark.slow
def test_a_killed_mixture_run_resumes_to_the_same_bytes(straight, tmp_path):
    root, cfg, res = straight
    sources = {n: res.stage_dirs[n] for n in ("docs", "code")}
    config = _config(root, {"docs": 0.7, "code": 0.3})["stages"]["pretrain"]
    out = tmp_path / "pretrain"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    import ray

    from pipeline.ray_init import init_ray

    init_ray(None)  # the Ray the pipeline runs above started in this process (a no-op then)
    address = ray.get_runtime_context().gcs_address  # both drivers attach to it, as a cluster's do
    args = [sys.executable, "-c", KILLED, str(out), json.dumps(sources), json.dumps(config), address]
    proc = subprocess.run(args, env={**env, "SEEDLINE_TRAIN_KILL_AT_STEP": "2"}, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 137, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / "checkpoints/step-2/complete.json").is_file() and not (out / "model").exists()
    resumed = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
                             check=False)
    assert resumed.returncode == 0 and "NOT KILLED" in resumed.stdout, resumed.stderr[-4000:]
    ref = Path(res.stage_dirs["pretrain"])
    for name in ("metrics.jsonl", "model/model.safetensors"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


@pytest.mark.slow
def test_a_source_that_runs_out_stops_the_run_when_configured(tmp_path):
    """on_exhausted: stop: the run ends before the first step some of whose rows are missing, with its
    evaluation, checkpoint and exported model, and says why."""
    cfg = _config(tmp_path, {"docs": 0.5, "code": 0.5}, code_docs=3, code_chars=400)
    cfg["stages"]["pretrain"] |= {"mixture": {"on_exhausted": "stop"}, "train": {
        "steps": 12, "micro_batch": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup": 1}}
    res = run_pipeline(validate_config(cfg))
    manifest = json.loads((Path(res.stage_dirs["code"]) / "manifest.json").read_text())
    code_rows = manifest["splits"]["train"]["rows"]
    out = Path(res.stage_dirs["pretrain"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    (event,) = [r for r in rows if r.get("event") == "source_exhausted"]
    assert event["source"] == "code" and event["rows"] == code_rows and event["step"] == steps[-1]
    assert 0 < steps[-1] < 12 and steps == list(range(1, steps[-1] + 1))
    last = [r for r in rows if "loss" in r][-1]
    assert last["tokens/code"] <= code_rows * 32 < last["tokens/code"] + 8 * 32  # less than a step short
    assert any("eval_loss" in r and r["step"] == steps[-1] for r in rows)
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "checkpoints" / f"step-{steps[-1]}" / "complete.json").is_file()


def test_mixture_config_errors_name_the_key(tmp_path):
    cfg = _config(tmp_path, {"docs": 0.7, "web": 0.3})
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.data.*\['web'\] are not stage instances"):
        validate_config(cfg)
    cfg = _config(tmp_path, {"docs": 0.7, "code": -1})
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.data.*positive"):
        validate_config(cfg)
    cfg = _config(tmp_path, {"docs": 1.0, "code": 1.0})
    cfg["stages"]["code"]["tokenizer"] = {"train": {"vocab_size": 500}}
    with pytest.raises(ConfigError, match=r"stages\.code\.tokenizer.*comes from stage docs"):
        validate_config(cfg)
    cfg = _config(tmp_path, {"docs": 1.0, "code": 1.0})
    cfg["stages"]["pretrain"]["inputs"] = ["docs"]
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.data.*name the same instances"):
        validate_config(cfg)
