"""The filter stage's section of the run report (its registered ``report`` hook): what each rule removed,
decontamination by evaluation set, and the run's data funnel.

The funnel reads what each stage writes in its own directory: dedupe's and the filter's ``stats.json``,
tokenize's ``stats.json``. The run's dedupe and tokenize instances are found by their store directory names
(``<type>-<fingerprint>``); with several of a type the funnel leaves that stage's rows out (it cannot tell
which one feeds this filter). Per-source columns come from the filter's ``by_source`` counts (the
``source_field`` of each document); dedupe and tokenize count totals only ("-" per source).
"""

from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.report import _e, _num, _table

DASH = "-"


def _stats(d: str | None) -> dict[str, Any]:
    return (storage.read_json_or(storage.join(d, "stats.json"), None) or {}) if d else {}


def _single(dirs: dict[str, str], type_name: str) -> str | None:
    """The stage directory of the run's only instance of ``type_name`` (None: none, or several)."""
    found = [d for d in dirs.values() if d.rstrip("/").rsplit("/", 1)[-1].rsplit("-", 1)[0] == type_name]
    return found[0] if len(found) == 1 else None


def funnel_rows(dedupe: dict[str, Any], filt: dict[str, Any], tokenize: dict[str, Any]) -> list[list[Any]]:
    """Rows ``[step, total, per source...]`` (sources in ``filt["by_source"]`` order; None: not known)."""
    sources = filt.get("by_source", {})
    per = list(sources.values())
    first = dedupe or filt
    def at_entry(key: str) -> list[Any]:  # per source only when the filter is the first stage
        return [None] * len(per) if dedupe else [c[key] for c in per]

    rows: list[list[Any]] = [
        ["documents in", first.get("docs_in"), *at_entry("docs_in")],
        ["text bytes in", first.get("text_bytes_in"), *at_entry("text_bytes_in")],
        ["rejected (malformed)", (dedupe.get("docs_rejected") or 0) + (filt.get("docs_rejected") or 0),
         *[None] * len(per)],
    ]
    if dedupe:
        rows += [["exact duplicates", dedupe.get("exact_duplicates"), *[None] * len(per)],
                 ["near duplicates", dedupe.get("near_duplicates"), *[None] * len(per)],
                 ["documents into filter", filt.get("docs_in"), *[c["docs_in"] for c in per]]]
    for rule, c in filt.get("removed", {}).items():
        if rule != "decontaminate":
            rows.append([f"removed: {rule}", c["docs"], *[s["removed"].get(rule, 0) for s in per]])
    decon = filt.get("removed", {}).get("decontaminate", {}).get("docs", 0)
    rows.append(["decontaminated", decon, *[s["removed"].get("decontaminate", 0) for s in per]])
    rows.append(["documents out", filt.get("docs_out"), *[c["docs_out"] for c in per]])
    rows.append(["text bytes out", filt.get("text_bytes_out"), *[c["text_bytes_out"] for c in per]])
    if tokenize:
        rows += [["documents tokenized", tokenize.get("docs"), *[None] * len(per)],
                 ["tokens out", tokenize.get("tokens"), *[None] * len(per)]]
    return rows


def section(instance: str, d: str, dirs: dict[str, str] | None = None) -> str:
    """The filter stage's part of ``report.html``: the data funnel, removals per rule, decontamination."""
    stats = _stats(d)
    if not stats:
        return ""
    dirs = dirs or {}
    rows = funnel_rows(_stats(_single(dirs, "dedupe")), stats, _stats(_single(dirs, "tokenize")))
    sources = [s or "(no source)" for s in stats.get("by_source", {})]
    header = ["step", "total", *[f"source {s}" for s in sources]]
    cells = [[_e(r[0]), *[_num(v) if v is not None else DASH for v in r[1:]]] for r in rows]
    out = [f"<h2>Data funnel: {_e(instance)}</h2>", _table(header, cells)]
    if stats.get("eval_sets"):
        decon = stats.get("decontaminated", {})
        erows = [[_e(name), _num(c.get("items")), _num(c.get("ngrams")), _num(decon.get(name, 0))]
                 for name, c in stats["eval_sets"].items()]
        out += ["<h3>Decontamination by evaluation set</h3>",
                _table(["evaluation set", "items", "n-grams", "documents removed"], erows)]
    return "".join(out)
