"""The dedupe stage's section of the run report (its registered ``report`` hook): its statistics grouped by
what they describe, each with its unit."""

from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.report import _e, _num, _table

# (stats.json key, what it is, unit); a key missing from a run's stats is left out
GROUPS: list[tuple[str, list[tuple[str, str, str]]]] = [
    ("Documents", [
        ("docs_in", "read", "documents"),
        ("docs_rejected", "malformed, quarantined in rejects/", "documents"),
        ("docs_good", "well-formed", "documents"),
        ("exact_duplicates", "exact duplicates removed", "documents"),
        ("near_duplicates", "near duplicates removed", "documents"),
        ("docs_out", "kept", "documents"),
    ]),
    ("Text", [
        ("text_bytes_in", "text read", "bytes"),
        ("text_bytes_out", "text kept", "bytes"),
        ("bytes_in", "input files", "bytes"),
        ("bytes_out", "output files (with ids and metadata)", "bytes"),
        ("shards", "input shards", "files"),
    ]),
    ("Near-duplicate search (MinHash LSH)", [
        ("lsh_bands", "bands", ""),
        ("lsh_rows", "rows per band", ""),
        ("exact_pairs", "pairs with identical text", "pairs"),
        ("candidate_pairs", "candidate pairs from LSH buckets", "pairs"),
        ("verified_pairs", "candidates verified as near duplicates", "pairs"),
        ("clustered_docs", "documents in a duplicate cluster", "documents"),
        ("components", "duplicate clusters (connected components)", "clusters"),
        ("largest_component", "largest component", "documents"),
        ("largest_cluster", "largest cluster", "documents"),
        ("oversize_components", "components too large to verify pairwise", "components"),
    ]),
]


def _value(v: Any, unit: str) -> str:
    if unit == "bytes":
        return f"{v / 1e6:,.2f} MB" if v >= 1e5 else f"{_num(v)} bytes"
    return f"{_num(v)} {unit}".strip()


def _rows(stats: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    known = set()
    for group, items in GROUPS:
        present = [(k, what, unit) for k, what, unit in items if isinstance(stats.get(k), int | float)]
        for i, (k, what, unit) in enumerate(present):
            rows.append([f"<b>{_e(group)}</b>" if i == 0 else "", _e(what), _value(stats[k], unit)])
            known.add(k)
    other = [(k, v) for k, v in stats.items()
             if k not in known and isinstance(v, int | float) and not isinstance(v, bool)]
    rows += [["<b>Other</b>" if i == 0 else "", _e(k), _num(v)] for i, (k, v) in enumerate(other)]
    return rows


def section(instance: str, d: str, dirs: dict[str, str] | None = None) -> str:
    """The dedupe stage's part of ``report.html``: documents kept and its statistics, grouped."""
    stats = storage.read_json_or(storage.join(d, "stats.json"), None)
    if not stats:
        return ""
    extra = ""
    docs_in, docs_out = stats.get("docs_in"), stats.get("docs_out")
    if docs_in and docs_out is not None:
        extra = (
            f"<p>{_num(docs_out)} of {_num(docs_in)} documents kept ({100 * docs_out / docs_in:.1f}%).</p>"
        )
    return f"<h2>Dedupe: {_e(instance)}</h2>" + extra + _table(["", "statistic", "value"], _rows(stats))
