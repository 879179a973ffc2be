"""The data step of the dpo stage: records -> quarantine -> train/val -> tokenized pairs on disk.

Outputs under the stage directory:

- ``pairs/train.arrow``, ``pairs/val.arrow`` (``stages.dpo.data``);
- ``rejects/<split>.jsonl``: every record not used, ``{"file", "line", "reason", "snippet"}``;
- ``pairs/prepared.json`` (written last, the step's marker): the counts that go into ``stats.json``.

It depends only on the input files, the tokenizer and the non-volatile config, so a run killed here
redoes the step to the same bytes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from pipeline import storage
from stages.common.records import Reject
from stages.dpo.data import Pair, PairEncoder, is_val, read_pairs, to_arrow_bytes

SPLITS = ("train", "val")
ENCODE_BATCH = 512


@dataclass(frozen=True)
class DataSpec:
    """What the data step needs from the stage config (plain values)."""

    data: str | list[str]
    val: str | list[str] | None
    val_fraction: float
    max_len: int
    max_prompt_len: int


def _reason_key(reason: str) -> str:
    """A short category for counting (the text before the first detail)."""
    return reason.split(" (")[0].split("[")[0]


def _read(spec: DataSpec) -> tuple[dict[str, list[Pair]], dict[str, list[Reject]], dict[str, int]]:
    rejects: dict[str, list[Reject]] = {s: [] for s in SPLITS}
    seen: dict[str, int] = {}
    train, seen["train"] = read_pairs(spec.data, "stages.dpo.data", rejects["train"].append)
    if spec.val is not None:
        val, seen["val"] = read_pairs(spec.val, "stages.dpo.val", rejects["val"].append)
    else:
        val = [p for p in train if is_val(p, spec.val_fraction)]
        train = [p for p in train if not is_val(p, spec.val_fraction)]
        seen["train"], seen["val"] = seen["train"] - len(val), len(val)
    return {"train": train, "val": val}, rejects, seen


def prepared(out_dir: str) -> dict[str, Any] | None:
    """The counts of a finished data step, or None."""
    return storage.read_json_or(storage.join(out_dir, "pairs", "prepared.json"), None)


def prepare(spec: DataSpec, tokenizer_json: str, out_dir: str) -> dict[str, Any]:
    """Run the data step (see the module docstring); returns the counts written to ``prepared.json``."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    pairs, rejects, seen = _read(spec)
    summary: dict[str, Any] = {}
    for split in SPLITS:
        encoder = PairEncoder(tokenizer, spec.max_len, spec.max_prompt_len)
        rows = []
        for i in range(0, len(pairs[split]), ENCODE_BATCH):
            rows += encoder.encode(pairs[split][i: i + ENCODE_BATCH])
        storage.write_bytes(storage.join(out_dir, "pairs", f"{split}.arrow"), to_arrow_bytes(rows))
        lines = [json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rejects[split]]
        storage.write_text(storage.join(out_dir, "rejects", f"{split}.jsonl"), "".join(lines))
        summary[split] = {"records": seen[split], "quarantined": len(rejects[split]),
                          "quarantine_reasons": dict(sorted(Counter(_reason_key(r.reason)
                                                                    for r in rejects[split]).items())),
                          **encoder.stats.to_dict()}
    storage.write_json(storage.join(out_dir, "pairs", "prepared.json"), summary)
    return summary
