"""The run report: a self-contained report.html with stages, data counts, loss curves and evaluation."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.report import write_report


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, sort_keys=True))  # as pipeline.storage.write_json writes


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "tiny"
    stages = {
        "dedupe": "dedupe-aaa",
        "tokenize": "tokenize-bbb",
        "pretrain": "pretrain-ccc",
        "sft": "sft-ddd",
        "dpo": "dpo-eee",
        "evaluate": "evaluate-fff",
    }
    # run.json keeps its keys sorted, as the runner writes it: the report orders stages by start time
    _write(
        run / "run.json",
        {"config": {"name": "tiny"}, "stages": dict(sorted(stages.items())), "git_sha": "abc"},
    )
    for i, (name, d) in enumerate(stages.items()):
        state = "failed" if name == "dpo" else "succeeded"
        _write(
            run / d / "status.json",
            {
                "state": state,
                "stage": name,
                "started": 1000.0 + i * 100,
                "finished": 1000.0 + i * 100 + 65 + i,
                "attempts": 1 + (name == "sft"),
                "error": "RuntimeError: boom" if state == "failed" else None,
            },
        )
    _write(
        run / "dedupe-aaa" / "stats.json",
        {
            "docs_in": 910,
            "docs_out": 841,
            "exact_duplicates": 58,
            "near_duplicates": 11,
            "reject_reasons": {},
        },
    )
    _write(
        run / "tokenize-bbb" / "manifest.json",
        {
            "vocab_size": 2048,
            "seq_len": 256,
            "tokenizer_sha256": "f00d",
            "splits": {
                "train": {"docs": 832, "stream_tokens": 332594, "rows": 1300, "shards": [{}]},
                "val": {"docs": 9, "stream_tokens": 1997, "rows": 8, "shards": [{}]},
            },
        },
    )
    for name in ("pretrain", "sft", "dpo"):
        lines = [{"step": s, "loss": 5.0 / s, "lr": 0.001} for s in range(1, 21)]
        lines += [{"step": 10, "eval_loss": 0.61}, {"step": 20, "eval_loss": 0.33}]
        (run / stages[name] / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    _write(
        run / "evaluate-fff" / "results.json",
        {
            "models": {
                "pretrain": {"perplexity": 40.5, "mc/acc": 0.25},
                "sft": {"perplexity": 35.25, "mc/acc": 0.5},
                "dpo": {"perplexity": 36.0, "mc/acc": 0.75, "pref_accuracy": 0.8},
            },
            "registered": {
                "uri": "models:/seedline-lm@candidate",
                "version": 3,
                "stage": "sft",
                "metric": "perplexity",
                "value": 35.25,
            },
        },
    )
    gens = [{"model": m, "index": i, "prompt": f"What does `f{i}` do?", "generation": f"{m} answer {i}<x>"}
            for i in range(6) for m in ("pretrain", "sft", "dpo")]
    (run / "evaluate-fff" / "generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gens))
    return run


def test_report_has_stages_data_curves_and_evaluation(tmp_path):
    run = _run_dir(tmp_path)
    path = write_report(str(run))
    assert path == str(run / "report.html")
    page = Path(path).read_text()
    # self-contained: every image is an embedded PNG, nothing is fetched
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert len(images) == 3 + 3  # a loss chart per training stage, a bar chart per evaluation metric
    assert "http" not in page.replace("http-equiv", "")
    # stage table: states, durations from status.json, attempts, the failure's reason
    for name in ("dedupe", "tokenize", "pretrain", "sft", "dpo", "evaluate"):
        assert f"<td>{name}</td>" in page
    assert "1m 05s" in page and "1m 09s" in page and "RuntimeError: boom" in page
    # data: dedupe and token counts
    assert "841 of 910 documents kept (92.4%)" in page and "332,594" in page and "f00d" in page
    # training curves and evaluation table, best value in bold
    assert "final eval_loss 0.3300" in page and 'alt="pretrain"' in page
    order = [
        page.index(f"<td>{name}</td>")
        for name in ("dedupe", "tokenize", "pretrain", "sft", "dpo", "evaluate")
    ]
    assert order == sorted(order)
    assert page.index('alt="pretrain"') < page.index('alt="sft"') < page.index('alt="dpo"')
    assert "<th>metric</th><th>pretrain</th><th>sft</th><th>dpo</th>" in page
    assert '<span class="best">35.2500</span>' in page and '<span class="best">0.7500</span>' in page
    assert "models:/seedline-lm@candidate" in page
    # generations: the first prompts, each model's answer side by side (escaped), the count of all
    gens = page[page.index("Generations (greedy"):]
    assert "<th>prompt</th><th>pretrain</th><th>sft</th><th>dpo</th>" in gens
    assert gens.count("What does `f") == 4 and '<pre class="gen">sft answer 3&lt;x&gt;</pre>' in gens
    assert "6 prompts in generations.jsonl" in gens


def test_report_needs_the_run_json_that_names_the_stages(tmp_path):
    run = _run_dir(tmp_path)
    (run / "run.json").unlink()  # the stages live in the shared store: run.json says which are this run's
    with pytest.raises(FileNotFoundError, match="no run.json"):
        write_report(str(run), str(tmp_path / "r.html"))


def test_pipeline_report_imports_no_heavy_modules():
    code = (
        "import sys, pipeline.report; "
        "print(sorted(m for m in ('torch', 'ray', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == "[]"
