"""The filter stage judged on its target: documents that pass the language and quality rules."""

from __future__ import annotations

from pipeline import storage
from pipeline.stage import Verdict


def verdict(stage_dir: str) -> Verdict | None:
    stats = storage.read_json_or(storage.join(stage_dir, "stats.json"), None)
    if not stats or "docs_in" not in stats:
        return None
    removed = stats.get("removed") or {}
    top = sorted(((r, v.get("docs", 0) if isinstance(v, dict) else v) for r, v in removed.items()),
                 key=lambda kv: -kv[1])[:3]
    why = ", ".join(f"{r} {n:,}" for r, n in top if n)
    return Verdict("documents", stats["docs_in"], stats["docs_out"], "",
                   f"removed by {why}" if why else "no document removed")
