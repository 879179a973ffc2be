"""The filter stage end to end on a real local Ray: removed/ and stats, decontamination, PII, rejects,
kill-and-resume, and a dedupe -> filter -> tokenize pipeline."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bench.real_text import docstrings
from pipeline.stage import Progress, StageContext
from pipeline.tracking import NullTracker
from stages.filter.config import FilterConfig
from stages.filter.run import KILL_ENV, run

REPO = Path(__file__).resolve().parents[3]
QUESTION = ("Which module of the standard library gives a portable way of using operating system "
            "dependent functionality such as reading or writing the environment")
FRENCH = ("Ceci est un document écrit entièrement en français. Il parle de la pluie et du beau temps, "
          "des saisons qui passent et des habitudes des gens de la ville. ") * 4


@pytest.fixture(scope="module")
def ray_address():
    import ray

    from pipeline.ray_init import init_ray

    init_ray(None, 2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _ctx(out: Path, address: str) -> StageContext:
    return StageContext(name="filter", out_dir=str(out), run_dir=str(out.parent), fingerprint="test",
                        inputs={}, tracker=NullTracker(), progress=Progress(None),
                        logger=logging.getLogger("test"), ray_address=address)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("filter")
    texts = docstrings(90)
    planted = texts[5] + "\n\n" + QUESTION + "? It is the os module.\n"
    with_pii = texts[7] + "\nContact the maintainer at jane.doe@example.org (host 192.168.10.12).\n"
    rows = [{"text": t, "source": "docs" if i % 2 else "web"} for i, t in enumerate(texts)]
    rows[5]["text"], rows[7]["text"] = planted, with_pii
    rows.append({"text": FRENCH, "source": "web"})
    src = root / "in"
    src.mkdir()
    for k in range(3):
        part = rows[k::3]
        bad = ['{"text": broken', json.dumps({"source": "x"})] if k == 0 else []
        lines = [json.dumps(r) for r in part] + bad
        (src / f"p{k}.jsonl").write_text("\n".join(lines) + "\n")
    evals = root / "eval"
    evals.mkdir()
    (evals / "mc.jsonl").write_text(json.dumps({"context": QUESTION, "choices": ["os", "sys"]}) + "\n")
    (evals / "prompts.jsonl").write_text(json.dumps({"prompt": "Tell me a story about a dragon and a "
                                                               "knight who become friends"}) + "\n")
    cfg = {"input": str(src / "*.jsonl"), "language": {"languages": ["en"], "min_score": 0.5},
           "gopher_repetition": {}, "gopher_quality": {"sources": ["web"]}, "fineweb": {"sources": ["web"]},
           "decontaminate": {"eval_files": [str(evals / "*.jsonl")]}, "pii": {}}
    return {"root": root, "cfg": cfg, "rows": rows, "planted": planted}


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.parts[len(out.parts)] in ("data", "removed", "rejects", "stats.json")}


@pytest.fixture(scope="module")
def filtered(corpus, ray_address, tmp_path_factory):
    out = tmp_path_factory.mktemp("filtered") / "out"
    stats = run(FilterConfig(**corpus["cfg"]), _ctx(out, ray_address))
    return {"out": out, "stats": stats}


def test_removed_documents_stats_and_rejects(corpus, filtered):
    out, stats = filtered["out"], filtered["stats"]
    kept = [r for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    removed = [r for p in sorted((out / "removed").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    n = len(corpus["rows"])
    assert (stats["docs_in"], stats["docs_rejected"], stats["docs_good"]) == (n + 2, 2, n)
    assert stats["docs_out"] == len(kept) and stats["docs_removed"] == len(removed) == n - len(kept)
    assert sum(c["docs"] for c in stats["removed"].values()) == len(removed)
    by_rule = {}
    for r in removed:
        by_rule.setdefault(r["rule"], []).append(r)
        assert r["value"] is not None and r["text"]
    for rule, c in stats["removed"].items():
        assert c["docs"] == len(by_rule[rule])
        assert c["text_bytes"] == sum(len(r["text"].encode()) for r in by_rule[rule])
    # The French document is removed by language id, with the detected language kept as a column.
    fr = [r for r in removed if r["text"] == FRENCH]
    assert fr and fr[0]["rule"] == "language.languages" and fr[0]["language"] == "fr"
    assert all(r["language"] == "en" and r["language_score"] >= 0.5 for r in kept)
    # Gopher quality and FineWeb apply to the "web" source only.
    assert all(r["source"] == "web" for r in removed if r["rule"].startswith(("gopher_quality", "fineweb")))
    assert any(r["rule"].startswith(("gopher_quality", "fineweb")) for r in removed)
    rejects = [json.loads(x) for x in (out / "rejects" / "00000.jsonl").read_text().splitlines()]
    assert [r["reason"].split(":")[0] for r in rejects] == ["invalid JSON", "missing field 'text'"]
    assert stats["reject_reasons"] == {"invalid JSON": 1, "missing field 'text'": 1}


def test_planted_evaluation_item_removed_and_reported(corpus, filtered):
    out, stats = filtered["out"], filtered["stats"]
    removed = [r for p in sorted((out / "removed").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    hit = [r for r in removed if r["rule"] == "decontaminate"]
    assert [r["text"] for r in hit] == [corpus["planted"]]
    assert hit[0]["detail"].startswith("mc.jsonl: which module of the standard library")
    assert stats["decontaminated"] == {"mc.jsonl": 1}
    assert stats["eval_sets"]["mc.jsonl"]["items"] == 1 and stats["eval_sets"]["prompts.jsonl"]["ngrams"] == 1


def test_pii_masked_and_counted(filtered):
    out, stats = filtered["out"], filtered["stats"]
    kept = [r for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    masked = [r["text"] for r in kept if "Contact the maintainer at" in r["text"]]
    assert masked and "email@example.com (host 0.0.0.0)" in masked[0]
    assert (stats["pii_emails"], stats["pii_ips"], stats["pii_docs"]) == (1, 1, 1)


_RESUME = """
import json, logging, sys
from pathlib import Path
from pipeline.stage import Progress, StageContext
from pipeline.tracking import NullTracker
from stages.filter.config import FilterConfig
from stages.filter.run import run
out, address, cfg = sys.argv[1:4]
ctx = StageContext(name="filter", out_dir=out, run_dir=str(Path(out).parent), fingerprint="t", inputs={},
                   tracker=NullTracker(), progress=Progress(None), logger=logging.getLogger("t"),
                   ray_address=address)
run(FilterConfig(**json.loads(cfg), num_workers=1), ctx)
"""


@pytest.mark.slow
def test_killed_run_resumes_to_identical_output(corpus, filtered, ray_address, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    cmd = [sys.executable, "-c", _RESUME, str(out), ray_address, json.dumps(corpus["cfg"])]
    proc = subprocess.run(cmd, env={**env, KILL_ENV: "shards:1"}, cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == 75, proc.stderr.decode()[-3000:]
    assert len(list((out / "work" / "shards").glob("*.json"))) == 1 and not (out / "stats.json").exists()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert _outputs(out) == _outputs(filtered["out"])


@pytest.mark.slow
def test_pipeline_dedupe_filter_tokenize(corpus, ray_address, tmp_path):
    from pipeline.config import validate_config
    from pipeline.runner import run_pipeline

    texts = docstrings(60)
    src = tmp_path / "corpus"
    src.mkdir()
    rows = [{"text": t} for t in texts] + [{"text": texts[0]}, {"text": FRENCH}]
    (src / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = validate_config({
        "name": "dft", "workdir": str(tmp_path / "runs"), "ray": {"address": ray_address},
        "stages": {"dedupe": {"input": str(src / "*.jsonl")},
                   "filter": {"language": {"languages": ["en"]}, "gopher_repetition": {}},
                   "tokenize": {"seq_len": 64, "val_fraction": 0.1,
                                "tokenizer": {"train": {"vocab_size": 300, "sample_docs": 50}}}},
    })
    result = run_pipeline(cfg)
    assert result.outcomes == {"dedupe": "ran", "filter": "ran", "tokenize": "ran"}
    fstats = json.loads((Path(result.stage_dirs["filter"]) / "stats.json").read_text())
    tstats = json.loads((Path(result.stage_dirs["tokenize"]) / "stats.json").read_text())
    assert fstats["docs_in"] == 61  # the exact duplicate never reaches the filter
    assert fstats["removed"]["language.languages"]["docs"] == 1
    assert tstats["docs"] == fstats["docs_out"] > 0


def test_decontamination_against_the_pipelines_own_eval_data(corpus, ray_address, tmp_path):
    """``eval_files`` omitted: the sets are the pipeline's evaluation-data fields, named by key path."""
    evals = corpus["root"] / "eval"
    cfg = {**corpus["cfg"], "decontaminate": {}}
    ctx = _ctx(tmp_path / "out", ray_address)
    ctx.eval_data = {"evaluate.tasks.0.path": [str(evals / "mc.jsonl")],
                     "evaluate.prompts": [str(evals / "prompts.jsonl")]}
    stats = run(FilterConfig(**cfg), ctx)
    removed = [r for p in sorted((tmp_path / "out" / "removed").glob("*.parquet"))
               for r in pq.read_table(p).to_pylist() if r["rule"] == "decontaminate"]
    assert [r["text"] for r in removed] == [corpus["planted"]]
    assert removed[0]["detail"].startswith("evaluate.tasks.0.path: which module of the standard library")
    assert stats["decontaminated"] == {"evaluate.tasks.0.path": 1}
    assert set(stats["eval_sets"]) == {"evaluate.tasks.0.path", "evaluate.prompts"}


def test_evaluate_records_upstream_decontamination():
    from stages.evaluate.lineage import decontamination

    ctx = StageContext(name="evaluate", out_dir="/x", run_dir="/", fingerprint="f", inputs={},
                       tracker=NullTracker(), progress=Progress(None), logger=logging.getLogger("t"))
    ctx.eval_data = {"evaluate.tasks.0.path": ["/e/mc.jsonl"], "evaluate.prompts": ["/e/p.jsonl"]}
    assert decontamination(ctx) == {"ran": False, "by": {},
                                    "uncovered": ["evaluate.prompts", "evaluate.tasks.0.path"]}
    ctx.extra = {"upstream": {"filter": {"type": "filter", "config": {"decontaminate": {"eval_files": None}}},
                              "tokenize": {"type": "tokenize", "config": {}}}}
    assert decontamination(ctx) == {"ran": True, "uncovered": [],
                                    "by": {"filter": ["evaluate.prompts", "evaluate.tasks.0.path"]}}
    ctx.extra["upstream"]["filter"]["config"]["decontaminate"]["eval_files"] = ["/e/mc*.jsonl"]
    assert decontamination(ctx) == {"ran": True, "by": {"filter": ["/e/mc*.jsonl"]},
                                    "uncovered": ["evaluate.prompts"]}


@pytest.mark.slow
def test_pipeline_funnel_and_decontamination_from_evaluate_tasks(ray_address, tmp_path):
    """dedupe -> filter -> tokenize on a few hundred real documents of two sources, the filter's
    decontamination reading the pipeline's evaluate task (``eval_files`` omitted); the report's funnel."""
    from pipeline.config import validate_config
    from pipeline.report import write_report
    from pipeline.runner import run_pipeline
    from stages.filter.report_section import funnel_rows

    texts = docstrings(300)
    src = tmp_path / "corpus"
    src.mkdir()
    rows = [{"text": t, "source": "docs" if i % 3 else "web"} for i, t in enumerate(texts)]
    rows[10]["text"] = texts[10] + "\n\n" + QUESTION + "? It is the os module.\n"
    rows += [{"text": texts[0], "source": "web"}, {"text": FRENCH, "source": "web"}]
    (src / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"text": broken\n')
    task = tmp_path / "mc.jsonl"
    task.write_text(json.dumps({"context": QUESTION, "choices": ["os", "sys"], "gold": 0}) + "\n")
    cfg = validate_config({
        "name": "funnel", "workdir": str(tmp_path / "runs"), "ray": {"address": ray_address},
        "stages": {"dedupe": {"input": str(src / "*.jsonl")},
                   "filter": {"language": {"languages": ["en"], "min_score": 0.0}, "decontaminate": {},
                              "gopher_repetition": {"sources": ["web"]}},  # min_score 0: docstrings are short
                   "tokenize": {"seq_len": 64, "val_fraction": 0.1,
                                "tokenizer": {"train": {"vocab_size": 300, "sample_docs": 50}}},
                   "pretrain": {}, "evaluate": {"tasks": [{"name": "mc", "path": str(task)}]}},
    })
    dirs: dict[str, str] = {}
    for stage in ("dedupe", "filter", "tokenize"):  # the training stages are not needed here
        result = run_pipeline(cfg, only=stage)
        assert result.outcomes == {stage: "ran"}
        dirs.update(result.stage_dirs)
    fdir = Path(dirs["filter"])
    fstats = json.loads((fdir / "stats.json").read_text())
    assert fstats["decontaminated"] == {"evaluate.tasks.0.path": 1}
    removed = [r for p in sorted((fdir / "removed").glob("*.parquet")) for r in pq.read_table(p).to_pylist()
               if r["rule"] == "decontaminate"]
    assert [r["source"] for r in removed] == ["docs"] and QUESTION in removed[0]["text"]
    assert removed[0]["detail"].startswith("evaluate.tasks.0.path: which module")

    dstats = json.loads((Path(dirs["dedupe"]) / "stats.json").read_text())
    tstats = json.loads((Path(dirs["tokenize"]) / "stats.json").read_text())
    table = {r[0]: r[1:] for r in funnel_rows(dstats, fstats, tstats)}
    assert list(fstats["by_source"]) == ["docs", "web"]
    assert table["documents in"][0] == len(rows) + 1 and table["rejected (malformed)"][0] == 1
    assert table["exact duplicates"][0] == dstats["exact_duplicates"] >= 1
    docs_in_filter = table["documents into filter"]
    assert docs_in_filter[0] == docs_in_filter[1] + docs_in_filter[2] == fstats["docs_in"]
    assert table["removed: language.languages"] == [1, 0, 1]  # the French document, source web
    assert table["decontaminated"] == [1, 1, 0]
    assert all(v[1] == 0 for k, v in table.items() if k.startswith("removed: gopher_repetition"))
    removed_total = sum(v[0] for k, v in table.items() if k.startswith("removed: ")) + 1
    assert table["documents out"][0] == fstats["docs_in"] - removed_total == tstats["docs"]
    assert table["tokens out"][0] == tstats["tokens"] > 0

    html = Path(write_report(result.run_dir)).read_text()
    assert "Data funnel: filter" in html and "source docs" in html and "source web" in html
    assert "Decontamination by evaluation set" in html and "evaluate.tasks.0.path" in html
