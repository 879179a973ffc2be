"""Held-out instruction answer loss on the sft stage's validation split, for every model.

The examples are the sft stage's own held-out split, already tokenized in ChatML with the assistant-only
mask (its ``instruction_val`` output: rows of packed examples). Each example is scored
on its own (positions from 0, nothing attended across examples: what sft's packed validation computes with
its document mask). A token counts iff the sft stage trains on it: assistant content and the closing
``<|im_end|>``.

``answer_loss`` = mean negative log-likelihood per scored token over every held-out example, the same
quantity as sft's ``eval_loss`` (which averages the first validation batches only). Every model gets it:
the pretrain model's value is sft's starting point, the sft model's where sft took it, the dpo model's
shows whether preference tuning kept the answers.
"""

from __future__ import annotations

import io

import pyarrow.ipc as ipc

from pipeline import storage


def load_requests(path: str, limit: int | None) -> list[tuple[list[int], list[bool]]]:
    """(ids, scored mask) of every example (the first ``limit``), unpacked from the sft val rows."""
    table = ipc.open_file(io.BytesIO(storage.read_bytes(path))).read_all()
    missing = [c for c in ("tokens", "loss_mask", "lengths") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing (have {table.column_names})")
    out: list[tuple[list[int], list[bool]]] = []
    rows = zip(*(table.column(c).to_pylist() for c in ("tokens", "loss_mask", "lengths")), strict=True)
    for r, (tokens, mask, lengths) in enumerate(rows):
        if len(tokens) != len(mask) or sum(lengths) != len(tokens):
            raise ValueError(f"{path}: row {r}: tokens, mask and example lengths disagree")
        start = 0
        for n in lengths:
            ids, scored = tokens[start:start + n], [bool(m) for m in mask[start:start + n]]
            start += n
            if any(scored[1:]):  # the first token has nothing before it: never a target
                out.append((ids, [False, *scored[1:]]))
            if limit is not None and len(out) == limit:
                return out
    return out


def answer_metrics(scores: list[tuple[float, int]]) -> dict[str, float]:
    """``answer_loss`` from per-example (summed log-probability, scored tokens)."""
    tokens = sum(n for _, n in scores)
    if not tokens:
        return {}
    return {"answer_loss": -sum(lp for lp, _ in scores) / tokens}
