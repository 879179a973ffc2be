"""The dedupe stage's section of the run report (its registered ``report`` hook)."""

from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.report import _e, _num, _table


def _scalars(stats: dict[str, Any]) -> list[list[str]]:
    return [
        [_e(k), _num(v)] for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)
    ]


def section(instance: str, d: str, dirs: dict[str, str] | None = None) -> str:
    """The dedupe stage's part of ``report.html``: documents kept and its statistics."""
    stats = storage.read_json_or(storage.join(d, "stats.json"), None)
    if not stats:
        return ""
    extra = ""
    docs_in, docs_out = stats.get("docs_in"), stats.get("docs_out")
    if docs_in and docs_out is not None:
        extra = (
            f"<p>{_num(docs_out)} of {_num(docs_in)} documents kept ({100 * docs_out / docs_in:.1f}%).</p>"
        )
    return f"<h2>Dedupe: {_e(instance)}</h2>" + extra + _table(["statistic", "value"], _scalars(stats))
