"""The pretrain stage's section of the run report: the data funnel of each source it trained on.

A source is a tokenize instance bound to the stage's ``data`` input (several for a weighted mixture). Its
chain is followed up the ``documents`` inputs recorded in ``run.json`` (tokenize <- filter <- dedupe, in any
combination), and each stage's own ``stats.json`` gives its rows: documents and bytes in, rejected,
duplicates, removed per filter rule, decontaminated, tokens out; the last row is what training took from
the source (``tokens/<source>`` of a mixture, else every token), read from this stage's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import storage
from pipeline.report import _e, _num, _table

DASH = "-"


def _stats(d: str | None) -> dict[str, Any]:
    return (storage.read_json_or(storage.join(d, "stats.json"), None) or {}) if d else {}


def _type(d: str) -> str:
    return d.rstrip("/").rsplit("/", 1)[-1].rsplit("-", 1)[0]


def chain(source: str, dirs: dict[str, str], inputs: dict[str, dict[str, list[str]]]) -> dict[str, dict]:
    """``{stage type: stats}`` of ``source`` and the stages upstream of it along ``documents``."""
    out: dict[str, dict] = {}
    name: str | None = source
    while name and name in dirs:
        out.setdefault(_type(dirs[name]), _stats(dirs[name]))
        ups = inputs.get(name, {}).get("documents") or []
        name = ups[0] if ups else None
    return out


def _trained(d: str, sources: list[str]) -> dict[str, float | None]:
    """Tokens training took from each source, from the last training line of ``metrics.jsonl``."""
    path = storage.join(d, "metrics.jsonl")
    last: dict[str, Any] = {}
    if storage.exists(path):
        for line in storage.read_text(path).splitlines():
            row = json.loads(line) if line.strip() else {}
            if "loss" in row:
                last = row
    keys = {sources[0]: "tokens"} if len(sources) == 1 else {s: f"tokens/{s}" for s in sources}
    return {s: int(last[k]) if k in last else None for s, k in keys.items()}


def funnel(sources: list[str], dirs: dict[str, str], inputs: dict[str, dict[str, list[str]]],
           trained: dict[str, float | None]) -> list[list[Any]]:
    """Rows ``[step, value per source...]`` (None: that source's chain has no such stage)."""
    chains = [chain(s, dirs, inputs) for s in sources]

    def first(c: dict[str, dict], key: str) -> Any:
        for t in ("dedupe", "filter", "tokenize"):
            if t in c and key in c[t]:
                return c[t][key]
        return None

    rows: list[list[Any]] = [
        ["documents in", *[first(c, "docs_in") for c in chains]],
        ["text bytes in", *[first(c, "text_bytes_in") for c in chains]],
        ["rejected (malformed)", *[sum(s.get("docs_rejected", 0) for s in c.values()) for c in chains]],
        ["exact duplicates", *[c.get("dedupe", {}).get("exact_duplicates") for c in chains]],
        ["near duplicates", *[c.get("dedupe", {}).get("near_duplicates") for c in chains]],
    ]
    rules = sorted({r for c in chains for r in c.get("filter", {}).get("removed", {})} - {"decontaminate"})
    for rule in rules:
        rows.append([f"removed: {rule}", *[c["filter"]["removed"].get(rule, {}).get("docs", 0)
                                           if "filter" in c else None for c in chains]])
    rows.append(["decontaminated", *[c["filter"].get("removed", {}).get("decontaminate", {}).get("docs", 0)
                                     if "filter" in c else None for c in chains]])
    rows.append(["documents tokenized", *[c.get("tokenize", {}).get("docs") for c in chains]])
    rows.append(["tokens out (train split)", *[c.get("tokenize", {}).get("tokens_train") for c in chains]])
    rows.append(["tokens trained on", *[trained.get(s) for s in sources]])
    out_tokens = rows[-2][1:]
    rows.append(["epochs (trained / out)", *[f"{t / o:.2f}" if t is not None and o else None
                                              for t, o in zip(rows[-1][1:], out_tokens, strict=True)]])
    return rows


def section(instance: str, d: str, dirs: dict[str, str] | None = None,
            inputs: dict[str, dict[str, list[str]]] | None = None) -> str:
    """The data funnel per source of pretrain instance ``instance``; empty without recorded bindings."""
    dirs, inputs = dirs or {}, inputs or {}
    sources = inputs.get(instance, {}).get("data") or []
    if not sources:
        return ""
    rows = funnel(sources, dirs, inputs, _trained(d, sources))
    cells = [[_e(r[0]), *[_num(v) if v is not None else DASH for v in r[1:]]] for r in rows]
    return (f"<h2>Data funnel by source: {_e(instance)}</h2>"
            + _table(["step", *[f"source {s}" for s in sources]], cells))
