"""Outputs explain themselves: the model card of an exported model, and the manifests of a real run
(dedupe + tokenize + pretrain through the pipeline runner, real Ray, DeepSpeed and MLflow)."""

from __future__ import annotations

import gzip
import json
import re
import stat
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from stages.lm.hf import export_hf
from stages.lm.model import CausalLM, ModelConfig
from stages.lm.model_card import CardInfo, write_model_card
from stages.tokenize import tokenizer as seedline_tok
from stages.tokenize.config import TrainTokenizer

MODEL = dict(vocab_size=320, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64,
             tie_embeddings=True)


def _export(root: Path) -> Path:
    tok = seedline_tok.train_bpe(["def read(path):\n    return open(path).read()\n"] * 50,
                                 TrainTokenizer(vocab_size=300, min_frequency=1))
    seedline_tok.save(tok, str(root / "tok"), model_max_length=64)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**MODEL))
    export_hf(model, str(root / "tok"), str(root / "model"))
    return root / "model"


def test_card_says_what_produced_the_model_and_its_snippet_runs(tmp_path):
    model_dir = _export(tmp_path)
    info = CardInfo(stage="sft", run_dir="runs/tiny", fingerprint="0123456789", steps=40, tokens=81920,
                    metrics={"loss": 3.8123, "eval_loss": 3.9}, data={"data": "demo-data/sft/train.jsonl"},
                    upstream={"pretrain": "aaaaaaaaaa"}, settings={"learning rate": 2e-5})
    write_model_card(str(model_dir), info)
    card = (model_dir / "README.md").read_text()
    for expect in ("# tiny / sft", "`sft`, fingerprint `0123456789`", "`runs/tiny`", "optimizer steps: 40",
                   "tokens trained on: 81,920", "| loss | 3.8123 |", "| eval_loss | 3.9000 |",
                   "`data`: `demo-data/sft/train.jsonl`", "`pretrain` (`aaaaaaaaaa`)", "learning rate: 2e-05",
                   "2 layers, hidden size 32, 2 attention heads (1 key/value heads)", "vocabulary 320",
                   "tied input/output embeddings", "seedline export gguf runs/tiny --stage sft"):
        assert expect in card, expect
    # the parameter count is the model's
    n = sum(p.numel() for p in CausalLM(ModelConfig(**MODEL)).parameters())
    assert f"{n:,} parameters" in card
    # the "how to load" snippet is real code: it loads this directory and generates with the chat template
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert str(model_dir.resolve()) in snippet and "apply_chat_template" in snippet
    exec(compile(snippet, "README.md", "exec"), {})
    assert stat.S_IMODE((model_dir / "README.md").stat().st_mode) == stat.S_IMODE(
        (model_dir / "config.json").stat().st_mode)


def test_card_without_metrics_or_chat_template(tmp_path):
    model_dir = _export(tmp_path)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": None}))
    write_model_card(str(model_dir), CardInfo(stage="pretrain", run_dir="/w/r", fingerprint="f", steps=0,
                                              tokens=0))
    card = (model_dir / "README.md").read_text()
    assert "none recorded" in card and "apply_chat_template" not in card
    assert "the upstream stages' outputs" in card


def _corpus(path: Path) -> list[str]:
    """Real text (the Python sources of this repository) as JSONL.gz with the user's own ids, one
    exact duplicate and a field named like an output column."""
    repo = Path(__file__).resolve().parents[3]
    files = sorted((repo / "pipeline").glob("*.py"))[:12]
    rows = [{"id": f"doc-{i}", "text": f.read_text(), "source": f.name} for i, f in enumerate(files)]
    rows.append({"id": "doc-copy", "text": rows[0]["text"], "source": "copy", "uid": 7})
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return [r["id"] for r in rows]


@pytest.mark.slow
def test_a_run_explains_its_outputs(tmp_path):
    import typer

    from pipeline.cli import load_plugins
    from pipeline.config import validate_config
    from pipeline.runner import run_pipeline

    ids = _corpus(tmp_path / "corpus" / "a.jsonl.gz")
    cfg = validate_config({
        "name": "card", "workdir": str(tmp_path / "runs"), "ray": {"num_cpus": 2},
        "stages": {
            "dedupe": {"input": str(tmp_path / "corpus" / "*.jsonl.gz")},
            "tokenize": {"seq_len": 32, "val_fraction": 0.1,
                         "tokenizer": {"train": {"vocab_size": 300, "sample_docs": 100}}},
            "pretrain": {"model": {"preset": "tiny", "overrides": {"dim": 32, "n_layers": 1, "n_heads": 2,
                                                                   "n_kv_heads": 1, "ffn_dim": 64}},
                         "train": {"steps": 2, "micro_batch": 2, "warmup": 1},
                         "scaling": {"num_workers": 1}, "checkpoint": {"every": 2}, "eval": {"every": 0}},
        },
    })
    res = run_pipeline(cfg)
    dedupe, tok, pre = (Path(res.stage_dirs[s]) for s in ("dedupe", "tokenize", "pretrain"))

    # dedupe: the user's ids are the documents' ids; manifest.json describes every column
    kept = pq.read_table(str(dedupe / "data")).to_pydict()
    assert sorted(kept["id"]) == sorted(ids[:-1]) and "input_id" not in kept
    assert kept["input_uid"] == [None] * len(kept["id"])  # only the removed copy had a `uid` field
    dups = pq.read_table(str(dedupe / "duplicates.parquet")).to_pylist()
    assert [(d["id"], d["kept_id"], d["kind"]) for d in dups] == [("doc-copy", "doc-0", "exact")]
    manifest = json.loads((dedupe / "manifest.json").read_text())
    docs = manifest["documents"]
    assert docs["rows"] == len(ids) - 1 == json.loads((dedupe / "stats.json").read_text())["docs_out"]
    assert set(docs["columns"]) == set(kept) and all(c["description"] for c in docs["columns"].values())
    assert "own `id`" in docs["columns"]["id"]["description"]
    assert docs["columns"]["source"]["type"] == "string"
    assert set(manifest["duplicates"]["columns"]) == {"id", "cluster_id", "kept_id", "kind"}

    # tokenize: the manifest describes the shard columns, which are the shards' columns
    tm = json.loads((tok / "manifest.json").read_text())
    shard = tok / tm["splits"]["train"]["shards"][0]["path"]
    import pyarrow as pa

    with pa.memory_map(str(shard)) as src:
        names = pa.ipc.open_file(src).schema.names
    assert set(tm["columns"]) == set(names) and all(tm["columns"].values())

    # pretrain: model card and world-readable weights
    card = (pre / "model" / "README.md").read_text()
    metrics = [json.loads(x) for x in (pre / "metrics.jsonl").read_text().splitlines()]
    tokens = [m for m in metrics if "tokens" in m][-1]["tokens"]
    loss = [m for m in metrics if "loss" in m][-1]["loss"]
    assert f"fingerprint `{pre.name.rsplit('-', 1)[1]}`" in card and "# card / pretrain" in card
    assert f"tokens trained on: {tokens:,}" in card and f"| loss | {loss:.4f} |" in card
    assert "optimizer steps: 2" in card and "`dedupe`" in card and "`tokenize`" in card
    for f in (pre / "model").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f.name

    # and the model exports as GGUF
    app = typer.Typer()
    load_plugins(app)
    r = CliRunner().invoke(app, ["export", "gguf", str(Path(res.run_dir)), "--stage", "pretrain"])
    assert r.exit_code == 0, r.output
    assert (pre / "model.gguf").stat().st_size > 0
