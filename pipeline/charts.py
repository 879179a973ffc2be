"""PNG charts (matplotlib, imported lazily): bars per metric, lines per series.

Used by the evaluate stage (charts logged to MLflow) and by the run report (``pipeline/report.py``).
The PNGs carry no timestamp, so the same numbers give the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


def _figure(width: float = 5.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def bar_png(title: str, values: Mapping[str, float]) -> bytes:
    """One bar per model (in the mapping's order), value printed on each bar."""
    fig = _figure()
    ax = fig.add_subplot()
    names = list(values)
    vals = [float(values[n]) for n in names]
    bars = ax.bar(names, vals, color=[PALETTE[i % len(PALETTE)] for i in range(len(names))])
    ax.bar_label(bars, labels=[f"{v:.4g}" for v in vals], fontsize=8)
    ax.set_title(title)
    ax.margins(y=0.15)
    return _png(fig)


def lines_png(
    title: str,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str = "step",
    ylabel: str = "loss",
) -> bytes:
    """Curves ``name -> (x, y)`` on one plot (e.g. ``loss`` and ``eval_loss`` of a training stage)."""
    fig = _figure()
    ax = fig.add_subplot()
    for i, (name, (x, y)) in enumerate(series.items()):
        marker = "o" if len(x) <= 20 else None
        ax.plot(list(x), list(y), label=name, color=PALETTE[i % len(PALETTE)], marker=marker, markersize=3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if series:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def metric_charts(models: Mapping[str, Mapping[str, float]]) -> dict[str, bytes]:
    """``{file name: png}``: one bar chart per metric over the models that have it."""
    metrics: list[str] = []
    for values in models.values():
        metrics += [m for m in values if m not in metrics]
    out = {}
    for m in metrics:
        vals = {stage: v[m] for stage, v in models.items() if m in v}
        out[f"{m.replace('/', '_')}.png"] = bar_png(m, vals)
    return out
