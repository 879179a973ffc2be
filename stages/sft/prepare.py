"""The data step of the sft stage: records -> quarantine -> train/val -> tokens -> rows on disk.

Outputs under the stage directory:

- ``data/train.arrow``, ``data/val.arrow`` (``stages.sft.data``; val may hold no rows);
- ``rejects/<split>.jsonl``: every record not trained on, ``{"file", "line", "reason", "snippet"}``
  (malformed records), plus ``"id"`` for those the length policy left out (too long for ``max_len``);
- ``data/prepared.json`` (written last, the step's marker): the counts that go into ``stats.json``.

It depends only on the input files, the tokenizer and the non-volatile config, so a run that is killed
here redoes the step to the same bytes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipeline import storage
from stages.common.records import SNIPPET_CHARS, Reject
from stages.sft.chat import ChatEncoder
from stages.sft.data import Encoded, RowStats, apply_length_policy, build_rows, rows_table, write_rows
from stages.sft.read import Example, is_val, read_examples

SPLITS = ("train", "val")
ENCODE_BATCH = 1024


@dataclass(frozen=True)
class DataSpec:
    """What the data step needs from the stage config (plain values: picklable, fingerprinted)."""

    data: str | list[str]
    val: str | list[str] | None
    val_fraction: float
    max_len: int
    packing: bool
    truncation: str


def _reason_key(reason: str) -> str:
    """A short category for counting (the text before the first detail)."""
    return reason.split(":")[0].split(" (")[0].split("[")[0]


def _dropped(ex: Example, reason: str) -> dict[str, Any]:
    """The reject record of an example the length policy left out: the same fields as a quarantined
    record (where it is, why, the start of it) plus its id."""
    snippet = json.dumps(ex.messages, ensure_ascii=False)[:SNIPPET_CHARS]
    return {"file": ex.file, "line": ex.line, "id": ex.id, "reason": reason, "snippet": snippet}


def _encode(encoder: ChatEncoder, examples: list[Example]) -> list[Encoded]:
    out: list[Encoded] = []
    for i in range(0, len(examples), ENCODE_BATCH):
        chunk = examples[i: i + ENCODE_BATCH]
        for ex, (ids, mask) in zip(chunk, encoder.encode_batch([e.messages for e in chunk]), strict=True):
            out.append(Encoded(ex.id, ids, mask))
    return out


def _read(spec: DataSpec) -> tuple[dict[str, list[Example]], dict[str, list[Reject]], dict[str, int]]:
    rejects: dict[str, list[Reject]] = {s: [] for s in SPLITS}
    seen: dict[str, int] = {}
    train, seen["train"] = read_examples(spec.data, "stages.sft.data", rejects["train"].append)
    if spec.val is not None:
        val, seen["val"] = read_examples(spec.val, "stages.sft.val", rejects["val"].append)
    else:
        val = [ex for ex in train if is_val(ex, spec.val_fraction)]
        train = [ex for ex in train if not is_val(ex, spec.val_fraction)]
        seen["val"] = 0
    return {"train": train, "val": val}, rejects, seen


def prepare(spec: DataSpec, tokenizer_json: str, out_dir: str) -> dict[str, Any]:
    """Run the data step (see the module docstring); returns the counts written to ``prepared.json``."""
    encoder = ChatEncoder.from_str(tokenizer_json)
    examples, rejects, seen = _read(spec)
    summary: dict[str, Any] = {}
    for split in SPLITS:
        stats = RowStats()
        encoded = _encode(encoder, examples[split])
        kept = apply_length_policy(encoded, spec.max_len, spec.truncation, stats)
        rows = build_rows(kept, spec.max_len, spec.packing)
        stats.examples, stats.rows = len(kept), len(rows)
        stats.tokens = int(sum(len(ex.ids) for ex in kept))
        stats.trained_tokens = int(sum(int(ex.mask[1:].sum()) for ex in kept))
        write_rows(storage.join(out_dir, "data", f"{split}.arrow"), rows_table(kept, rows))
        lines = [json.dumps(r.to_dict(), ensure_ascii=False) for r in rejects[split]]
        by_id = {ex.id: ex for ex in examples[split]}
        lines += [json.dumps(_dropped(by_id[i], why), ensure_ascii=False) for i, why in stats.dropped_ids]
        storage.write_text(storage.join(out_dir, "rejects", f"{split}.jsonl"),
                           "".join(line + "\n" for line in lines))
        summary[split] = {"records": seen[split], "quarantined": len(rejects[split]),
                          "quarantine_reasons": dict(sorted(Counter(_reason_key(r.reason)
                                                                    for r in rejects[split]).items())),
                          **stats.to_dict(spec.max_len)}
    if spec.val is None:  # the held-out share came out of the train files
        summary["val"]["records"] = summary["val"]["examples"] + summary["val"]["dropped_too_long"] \
            + summary["val"]["dropped_no_target"]
        summary["train"]["records"] -= summary["val"]["records"]
    storage.write_json(storage.join(out_dir, "data", "prepared.json"), summary)
    return summary
