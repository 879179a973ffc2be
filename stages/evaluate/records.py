"""Reading small JSONL evaluation files (tasks, prompts, preference pairs) line by line.

A line that is not UTF-8 or not JSON is not fatal: it comes back with the reason, so the caller can
quarantine it. Blank lines are not records. Lines are numbered from 1. ``.gz`` files are decompressed.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from typing import Any

from pipeline import storage


def read_jsonl(path: str) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object or None, error or None) for every non-blank line of ``path``."""
    data = storage.read_bytes(path)
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw.decode("utf-8")), None
        except UnicodeDecodeError as e:
            yield n, None, f"not UTF-8: {e.reason} at byte {e.start}"
        except json.JSONDecodeError as e:
            yield n, None, f"not JSON: {e.msg} at column {e.colno}"


def write_rejects(path: str, rejects: list[dict[str, Any]]) -> None:
    """Quarantined records with their reasons, one JSON object a line (atomic)."""
    storage.write_text(
        path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rejects)
    )
