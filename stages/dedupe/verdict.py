"""The dedupe stage judged on its target: documents kept once duplicates are out."""

from __future__ import annotations

from pipeline import storage
from pipeline.stage import Verdict


def verdict(stage_dir: str) -> Verdict | None:
    stats = storage.read_json_or(storage.join(stage_dir, "stats.json"), None)
    if not stats:
        return None
    note = f"{stats.get('exact_duplicates', 0):,} exact + {stats.get('near_duplicates', 0):,} near duplicates"
    if stats.get("docs_rejected"):
        note += f", {stats['docs_rejected']:,} malformed quarantined"
    return Verdict("documents", stats["docs_in"], stats["docs_out"], "", note)
