"""The training stages judged on their own targets (the end-of-run summary and the report's verdict).

pretrain: the loss, from the first step's to the held-out loss at the end; sft: the held-out answer loss
of the starting model (``base_eval_loss``) against the trained one; dpo: held-out preference accuracy
(the policy prefers the chosen answer) of the starting model against the trained one, with the reward
accuracy and margin TRL reports.
"""

from __future__ import annotations

import json

from pipeline import storage
from pipeline.stage import Verdict


def _metrics(stage_dir: str) -> tuple[dict, dict]:
    """(first training line, last value of every metric) of ``metrics.jsonl``."""
    first: dict = {}
    last: dict = {}
    try:
        text = storage.read_text(storage.join(stage_dir, "metrics.jsonl"))
    except FileNotFoundError:
        return first, last
    for line in text.splitlines():
        row = json.loads(line) if line else {}
        if "event" in row:
            continue
        if not first and "loss" in row:
            first = row
        last |= row
    return first, last


def pretrain(stage_dir: str) -> Verdict | None:
    first, last = _metrics(stage_dir)
    if not first:
        return None
    after = last.get("eval_loss", last.get("loss"))
    target = "loss, step 1 -> held-out" if "eval_loss" in last else "training loss"
    return Verdict(target, first["loss"], after, "lower", f"{last.get('tokens', 0):,} tokens")


def sft(stage_dir: str) -> Verdict | None:
    stats = storage.read_json_or(storage.join(stage_dir, "stats.json"), None) or {}
    if "eval_loss" not in stats:
        return None
    return Verdict("held-out answer loss", stats.get("base_eval_loss"), stats["eval_loss"], "lower")


def dpo(stage_dir: str) -> Verdict | None:
    stats = storage.read_json_or(storage.join(stage_dir, "stats.json"), None) or {}
    if "heldout_logp_accuracy" not in stats:
        return None
    nan = float("nan")
    return Verdict("held-out preference accuracy", stats.get("base_eval_logp_accuracy"),
                   stats["heldout_logp_accuracy"], "higher",
                   f"reward accuracy {stats.get('heldout_rewards/accuracies', nan):.2f} vs chance 0.5, "
                   f"{stats.get('heldout_pairs', 0)} pairs")
