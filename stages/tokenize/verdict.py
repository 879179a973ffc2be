"""The tokenize stage judged on its target: the tokens it made for training and validation."""

from __future__ import annotations

from pipeline import storage
from pipeline.stage import Verdict


def verdict(stage_dir: str) -> Verdict | None:
    stats = storage.read_json_or(storage.join(stage_dir, "stats.json"), None)
    if not stats or "tokens_train" not in stats:
        return None
    return Verdict("train tokens", None, stats["tokens_train"], "",
                   f"{stats['tokens_val']:,} val, vocabulary {stats.get('vocab_size', 0):,}")
