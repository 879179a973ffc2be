"""The evaluate stage's section of the run report (its registered ``report`` hook)."""

from __future__ import annotations

import math

from pipeline import storage
from pipeline.charts import metric_charts
from pipeline.report import _e, _img, _num, _table
from stages.evaluate.config import MODEL_STAGES
from stages.evaluate.report_md import lower_is_better, metric_label, why


def section(instance: str, d: str, dirs: dict[str, str] | None = None) -> str:
    """The evaluate stage's part of ``report.html``: the comparison table, the registered model, charts."""
    results = storage.read_json_or(storage.join(d, "results.json"), None)
    if not results or not results.get("models"):
        return ""
    order = {s: i for i, s in enumerate(results.get("order") or MODEL_STAGES)}  # pipeline order again
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
            [_e(metric_label(m, results.get("baselines")))]
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
            f"the {_e(reg['stage'])} model: {_e(why(reg))}.</p>"
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
        + _generations(d, stages)
    )


def _generations(d: str, stages: list[str], prompts: int = 4, chars: int = 240) -> str:
    """The first ``prompts`` prompts of ``generations.jsonl`` with every model's greedy answer beside."""
    import json

    path = storage.join(d, "generations.jsonl")
    if not storage.exists(path):
        return ""
    by_prompt: dict[int, dict] = {}
    for line in storage.read_text(path).splitlines():
        if line.strip():
            g = json.loads(line)
            by_prompt.setdefault(g["index"], {"prompt": g["prompt"]})[g["model"]] = g["generation"]
    rows = []
    for _, gens in sorted(by_prompt.items())[:prompts]:
        cells = [gens.get(s) for s in stages]
        shown = [c if c is None or len(c) <= chars else c[:chars] + " …" for c in cells]
        rows.append([_e(gens["prompt"])]
                    + [f'<pre class="gen">{_e(c)}</pre>' if c is not None else "–" for c in shown])
    return ("<h3>Generations (greedy, side by side)</h3>" + _table(["prompt", *stages], rows)
            + f'<p class="muted">{len(by_prompt)} prompts in generations.jsonl.</p>')
