"""The evaluate stage's verdict: which model was registered, and why."""

from __future__ import annotations

from pipeline import storage
from pipeline.stage import Verdict


def verdict(stage_dir: str) -> Verdict | None:
    results = storage.read_json_or(storage.join(stage_dir, "results.json"), None)
    if not results or not results.get("models"):
        return None
    reg = results.get("registered") or {}
    if not reg.get("uri"):
        return Verdict("models evaluated", None, len(results["models"]), "", "nothing registered")
    from stages.evaluate.report_md import why

    return Verdict(f"registered {reg['stage']}", None, None, "", why(reg))
