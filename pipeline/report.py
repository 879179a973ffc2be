"""The run report: one self-contained ``report.html`` (PNG charts embedded as data URIs) for a run directory.

Sections, each present when the run has the stage: the stages with state, duration and attempts
(``status.json``); dedupe statistics (``stats.json``); token counts per split (tokenize ``manifest.json``);
the loss curves of every training stage (``metrics.jsonl``: ``loss`` per step, ``eval_loss`` per
validation); the evaluation table and charts (evaluate ``results.json``).

Nothing heavy at import time: matplotlib is imported when charts are drawn.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from typing import Any

from pipeline import storage

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.3em .7em;text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}.best{font-weight:bold}
.charts img{max-width:48%;margin:.3em}.failed{color:#b00}.succeeded{color:#070}.muted{color:#777}
"""
TRAINING_CURVES = (("loss", "loss"), ("eval_loss", "eval_loss"))


def _e(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return _e(v)
    if isinstance(v, int):
        return f"{v:,}"
    if math.isnan(v):
        return "nan"
    return f"{v:,.4f}" if abs(v) < 1e4 else f"{v:,.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{seconds:.1f}s"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def stage_dirs(run_dir: str) -> dict[str, str]:
    """``{stage: directory}`` in the order the stages ran (start times; stages not started last, by name):
    from ``run.json``, else every sub-directory with a ``status.json``."""
    run = storage.read_json_or(storage.join(run_dir, "run.json"), {})
    if run.get("stages"):
        dirs = {name: storage.join(run_dir, d) for name, d in run["stages"].items()}
    else:
        dirs = {}
        for name in storage.listdir(run_dir):
            status = storage.read_json_or(storage.join(run_dir, name, "status.json"), None)
            if status:
                dirs[status.get("stage") or name.rsplit("-", 1)[0]] = storage.join(run_dir, name)

    def started(name: str) -> tuple[float, str]:
        st = storage.read_json_or(storage.join(dirs[name], "status.json"), {})
        return (st.get("started") or math.inf, name)

    return {name: dirs[name] for name in sorted(dirs, key=started)}


def _stages_section(dirs: dict[str, str]) -> str:
    rows = []
    for name, d in dirs.items():
        st = storage.read_json_or(storage.join(d, "status.json"), {"state": "pending"})
        started, finished = st.get("started"), st.get("finished")
        dur = finished - started if started and finished else None
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "–"
        state = st.get("state", "pending")
        err = f'<br><span class="failed">{_e(st["error"])}</span>' if st.get("error") else ""
        rows.append(
            [
                _e(name),
                f'<span class="{_e(state)}">{_e(state)}</span>{err}',
                _duration(dur),
                when,
                _num(st.get("attempts", 0)),
                f'<span class="muted">{_e(d.rsplit("/", 1)[-1])}</span>',
            ]
        )
    return "<h2>Stages</h2>" + _table(
        ["stage", "state", "duration", "started", "attempts", "directory"], rows
    )


def _scalars(stats: dict[str, Any]) -> list[list[str]]:
    return [
        [_e(k), _num(v)] for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)
    ]


def _dedupe_section(d: str) -> str:
    stats = storage.read_json_or(storage.join(d, "stats.json"), None)
    if not stats:
        return ""
    extra = ""
    docs_in, docs_out = stats.get("docs_in"), stats.get("docs_out")
    if docs_in and docs_out is not None:
        extra = (
            f"<p>{_num(docs_out)} of {_num(docs_in)} documents kept ({100 * docs_out / docs_in:.1f}%).</p>"
        )
    return "<h2>Dedupe</h2>" + extra + _table(["statistic", "value"], _scalars(stats))


def _tokenize_section(d: str) -> str:
    manifest = storage.read_json_or(storage.join(d, "manifest.json"), None)
    if not manifest:
        return ""
    rows = [
        [
            _e(split),
            _num(s.get("docs")),
            _num(s.get("stream_tokens")),
            _num(s.get("rows")),
            _num(len(s.get("shards", []))),
        ]
        for split, s in manifest.get("splits", {}).items()
    ]
    info = (
        f"<p>vocabulary {_num(manifest.get('vocab_size'))}, sequence length {_num(manifest.get('seq_len'))}, "
        f"tokenizer sha256 <code>{_e(manifest.get('tokenizer_sha256', '?'))}</code></p>"
    )
    return "<h2>Tokens</h2>" + info + _table(["split", "documents", "tokens", "rows", "shards"], rows)


def read_curves(path: str) -> dict[str, tuple[list[float], list[float]]]:
    """``{metric: (steps, values)}`` for ``loss`` and ``eval_loss`` of a ``metrics.jsonl``."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    with storage.open_read(path, "r") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            for key, label in TRAINING_CURVES:
                v = rec.get(key)
                if isinstance(v, int | float) and "step" in rec:
                    xs, ys = curves.setdefault(label, ([], []))
                    xs.append(rec["step"])
                    ys.append(v)
    return curves


def _training_section(dirs: dict[str, str]) -> str:
    from stages.evaluate.charts import lines_png

    parts = []
    for name, d in dirs.items():
        path = storage.join(d, "metrics.jsonl")
        if not storage.exists(path):
            continue
        curves = read_curves(path)
        if not curves:
            continue
        last = {k: ys[-1] for k, (_, ys) in curves.items()}
        summary = ", ".join(f"final {k} {_num(v)}" for k, v in last.items())
        parts.append(
            f"<div><h3>{_e(name)}</h3><p>{summary}</p>{_img(lines_png(f'{name} loss', curves), name)}</div>"
        )
    return "<h2>Training</h2>" + "".join(parts) if parts else ""


def _evaluation_section(d: str) -> str:
    from stages.evaluate.charts import metric_charts
    from stages.evaluate.report_md import lower_is_better

    results = storage.read_json_or(storage.join(d, "results.json"), None)
    if not results or not results.get("models"):
        return ""
    from stages.evaluate.config import MODEL_STAGES

    order = {s: i for i, s in enumerate(MODEL_STAGES)}  # results.json's keys are sorted: pipeline order again
    models: dict[str, dict[str, float]] = dict(
        sorted(results["models"].items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    )
    stages = list(models)
    metrics: list[str] = []
    for vals in models.values():
        metrics += [m for m in vals if m not in metrics]
    rows = []
    for m in metrics:
        vals = [models[s].get(m) for s in stages]
        real = [v for v in vals if v is not None and not math.isnan(v)]
        best = (min(real) if lower_is_better(m) else max(real)) if len(real) > 1 else None
        rows.append(
            [f"{_e(m)} {'↓' if lower_is_better(m) else '↑'}"]
            + [
                f'<span class="best">{_num(v)}</span>'
                if v is not None and v == best
                else (_num(v) if v is not None else "–")
                for v in vals
            ]
        )
    reg = results.get("registered")
    note = (
        (
            f"<p>Registered <code>{_e(reg['uri'])}</code> (version {_e(reg['version'])}): "
            f"the {_e(reg['stage'])} model, best by {_e(reg['metric'])}.</p>"
        )
        if reg
        else ""
    )
    charts = "".join(_img(png, name) for name, png in metric_charts(models).items())
    return (
        "<h2>Evaluation</h2>"
        + _table(["metric", *stages], rows)
        + note
        + f'<div class="charts">{charts}</div>'
    )


def write_report(run_dir: str, out_path: str | None = None) -> str:
    """Write the run's report (default ``<run_dir>/report.html``) and return its path."""
    dirs = stage_dirs(run_dir)
    if not dirs:
        raise FileNotFoundError(f"{run_dir}: no run.json and no stage directories (is this a run directory?)")
    run = storage.read_json_or(storage.join(run_dir, "run.json"), {})
    name = (run.get("config") or {}).get("name") or run_dir.rstrip("/").rsplit("/", 1)[-1]
    body = [
        f"<h1>Seedline run: {_e(name)}</h1>",
        f'<p class="muted">{_e(run_dir)}; git {_e(run.get("git_sha") or "unknown")}</p>',
        _stages_section(dirs),
    ]
    if "dedupe" in dirs:
        body.append(_dedupe_section(dirs["dedupe"]))
    if "tokenize" in dirs:
        body.append(_tokenize_section(dirs["tokenize"]))
    body.append(_training_section(dirs))
    for d in dirs.values():
        body.append(_evaluation_section(d))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Seedline run {_e(name)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
    path = out_path or storage.join(run_dir, "report.html")
    storage.write_text(path, page)
    return path
