"""The run report: one self-contained ``report.html`` (PNG charts embedded as data URIs) for a run directory.

It opens with a verdict (total time; each stage judged on its own target by its type's ``verdict``
hook, before -> after; links to the MLflow runs and models). Then sections, each present when the run
has the stage: the stages with state, duration and attempts
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
.verdict td:nth-child(2),.verdict td:nth-child(6),.verdict th:nth-child(2),.verdict th:nth-child(6){
text-align:left}
pre.gen{white-space:pre-wrap;text-align:left;font-size:.85em;margin:0;max-width:26em}
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
    """``{instance: directory}`` in the order the stages ran (start times; stages not started last, by
    name), from ``run.json``."""
    from pipeline.state import recorded_stage_dirs

    dirs = recorded_stage_dirs(run_dir)

    def started(name: str) -> tuple[float, str]:
        st = storage.read_json_or(storage.join(dirs[name], "status.json"), {})
        return (st.get("started") or math.inf, name)

    return {name: dirs[name] for name in sorted(dirs, key=started)}


def stage_types(run: dict[str, Any]) -> dict[str, str]:
    """``{instance: stage type}`` from a ``run.json``."""
    stages = (run.get("config") or {}).get("stages") or {}
    return {name: (sec or {}).get("type", name) for name, sec in stages.items()}


def _hook_sections(dirs: dict[str, str], types: dict[str, str],
                   run_dirs: dict[str, str] | None = None,
                   inputs: dict[str, dict[str, list[str]]] | None = None) -> list[str]:
    """Each stage type's own report section (its registered ``report`` hook), in run order. A hook is
    called as ``hook(instance, stage_dir, run_dirs)``: ``run_dirs`` maps every instance of the run to its
    directory, so a section can read upstream stages' outputs (the filter's data funnel does). A hook with
    an ``inputs`` parameter also gets the run's bindings, ``{instance: {slot: [upstream instances]}}``."""
    import inspect

    from pipeline import stage as stage_registry

    out = []
    for name, d in dirs.items():
        spec = stage_registry.registry().get(types.get(name, name))
        if spec is not None and spec.report:
            hook = stage_registry._load(spec.report)
            extra = {"inputs": inputs or {}} if "inputs" in inspect.signature(hook).parameters else {}
            out.append(hook(name, d, dict(run_dirs or dirs), **extra))
    return [s for s in out if s]


def _mlflow_links(run: dict[str, Any], run_ids: dict[str, str]) -> tuple[dict[str, str], str]:
    """``{instance: URL}`` of the stages' MLflow runs as ``seedline ui`` serves them (127.0.0.1:5000),
    and a note when the tracking store cannot be read here (the run ids are shown instead)."""
    uri = run.get("tracking_uri")
    if not uri or not run_ids:
        return {}, ""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exps = {name: client.get_run(rid).info.experiment_id for name, rid in run_ids.items()}
    except Exception as e:  # a store on another machine or server: the ids still identify the runs
        return {}, f"MLflow store {uri} not readable from here ({type(e).__name__}); run ids shown"
    return {n: f"http://127.0.0.1:5000/#/experiments/{exps[n]}/runs/{rid}" for n, rid in run_ids.items()}, ""


def _verdict_section(run_dir: str, dirs: dict[str, str], run: dict[str, Any]) -> str:
    """The page's opening: total time, each stage judged on its own target (before -> after), the
    registered model and why, links to its MLflow run and its model directory."""
    from pipeline.summary import verdicts

    judged = verdicts(run_dir, dirs)
    status = {n: storage.read_json_or(storage.join(d, "status.json"), {}) for n, d in dirs.items()}
    starts = [s["started"] for s in status.values() if s.get("started")]
    ends = [s["finished"] for s in status.values() if s.get("finished")]
    total = max(ends) - min(starts) if starts and ends else None
    run_ids = {n: s["mlflow_run_id"] for n, s in status.items() if s.get("mlflow_run_id")}
    links, note = _mlflow_links(run, run_ids)
    rows = []
    for name, d in dirs.items():
        v, st = judged.get(name), status[name]
        mark = {True: '<span class="succeeded">better</span>', False: '<span class="failed">worse</span>',
                None: ""}[v.improved if v else None]
        where = [f'<a href="{_e(links[name])}">MLflow run</a>' if name in links else
                 _e(st.get("mlflow_run_id") or "")]
        if storage.exists(storage.join(d, "model", "config.json")) and not storage.is_url(d):
            where.append(f'<a href="file://{_e(storage.join(d, "model"))}">model</a>')
        rows.append([_e(name), _e(v.target) if v else _e(st.get("state", "pending")),
                     _num(v.before) if v and v.before is not None else "",
                     _num(v.after) if v and v.after is not None else "", mark,
                     _e(v.note) if v else "", " ".join(w for w in where if w)])
    head = f"<p>Total time {_duration(total)} for {len(dirs)} stages.</p>"
    return ("<h2>Verdict</h2>" + head
            + '<div class="verdict">'
            + _table(["stage", "target", "before", "after", "", "note", "links"], rows) + "</div>"
            + (f'<p class="muted">{_e(note)}</p>' if note else ""))


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
    from pipeline.charts import lines_png

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


def _sweep_page(sweep_dir: str, index: dict[str, Any]) -> str:
    """A sweep's report: the comparison table and, per training instance, every variant's loss curve on
    shared axes."""
    from pipeline.charts import lines_png
    from pipeline.compare import render, table

    rows = table([sweep_dir])
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for v in index["variants"]:
        for inst, d in stage_dirs(v["run_dir"]).items():
            path = storage.join(d, "metrics.jsonl")
            if storage.exists(path) and "loss" in (c := read_curves(path)):
                curves.setdefault(inst, {})[v["name"]] = c["loss"]
    charts = "".join(_img(lines_png(f"{inst}: loss by variant", series), inst)
                     for inst, series in curves.items())
    keys = ", ".join(f"{k} in {vals}" for k, vals in index["sweep"].items())
    return (f"<h1>Seedline sweep: {_e(sweep_dir.rstrip('/').rsplit('/', 1)[-1])}</h1><p>{_e(keys)}</p>"
            f"<h2>Variants</h2><pre>{_e(render(rows))}</pre><h2>Training</h2>{charts}")


def write_report(run_dir: str, out_path: str | None = None) -> str:
    """Write the run's report (default ``<run_dir>/report.html``) and return its path; for a sweep
    directory, the sweep's report (variants side by side, loss curves on shared axes)."""
    from pipeline.sweep import read_index

    index = read_index(run_dir)
    if index:
        path = out_path or storage.join(run_dir, "report.html")
        body = _sweep_page(run_dir, index)
        storage.write_text(path, f"<!doctype html><html><head><meta charset='utf-8'><title>Seedline sweep"
                                 f"</title><style>{STYLE}</style></head><body>{body}</body></html>\n")
        return path
    dirs = stage_dirs(run_dir)
    if not dirs:
        raise FileNotFoundError(f"{run_dir}: no run.json with stages (is this a run directory?)")
    run = storage.read_json_or(storage.join(run_dir, "run.json"), {})
    name = (run.get("config") or {}).get("name") or run_dir.rstrip("/").rsplit("/", 1)[-1]
    body = [
        f"<h1>Seedline run: {_e(name)}</h1>",
        f'<p class="muted">{_e(run_dir)}; git {_e(run.get("git_sha") or "unknown")}</p>',
        _verdict_section(run_dir, dirs, run),
        _stages_section(dirs),
    ]
    types = stage_types(run)
    data = [d for d in _hook_sections({n: d for n, d in dirs.items() if types.get(n) != "evaluate"}, types,
                                      dirs, run.get("inputs"))]
    body += data
    body.append(_training_section(dirs))
    body += _hook_sections({n: d for n, d in dirs.items() if types.get(n) == "evaluate"}, types, dirs)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Seedline run {_e(name)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
    path = out_path or storage.join(run_dir, "report.html")
    storage.write_text(path, page)
    return path
