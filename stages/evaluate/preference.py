"""Held-out preference accuracy on the dpo stage's validation pairs.

The pairs are the dpo stage's own held-out split, already tokenized (its ``preference_pairs`` output: per pair
the chosen and the rejected sequence with a mask of the scored tokens: the completion's assistant content
and its closing ``<|im_end|>``, exactly the tokens dpo trains on). A completion's log-probability is the sum
over its scored tokens.

Per model: ``pref_logp_accuracy`` = share of pairs where the model gives the chosen completion the higher
log-probability. For the dpo model, against its reference (the sft model, evaluated here with the same
code; without an sft stage, the reference log-probabilities the dpo stage saved), TRL's implicit reward
``beta * (logp_policy - logp_ref)``: ``pref_accuracy`` = share of pairs whose chosen reward exceeds the
rejected one (TRL's ``rewards/accuracies``), ``pref_margin`` = mean reward margin (``rewards/margins``).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow.ipc as ipc

from pipeline import storage

SIDES = ("chosen", "rejected")


def _read(path: str):
    return ipc.open_file(io.BytesIO(storage.read_bytes(path))).read_all()


def pair_count(path: str) -> int:
    """Pairs in a held-out pairs file (the dpo stage's ``preference_pairs`` output)."""
    return _read(path).num_rows


def load_requests(path: str, limit: int | None) -> list[tuple[list[int], list[bool]]]:
    """(ids, scored mask) of the chosen then the rejected sequence, pair after pair (the first ``limit``),
    from the dpo stage's ``preference_pairs`` output."""
    table = _read(path)
    missing = [c for s in SIDES for c in (s, f"{s}_mask") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing (have {table.column_names})")
    n = table.num_rows if limit is None else min(limit, table.num_rows)
    cols = {c: table.column(c).to_pylist()[:n] for s in SIDES for c in (s, f"{s}_mask")}
    out = []
    for i in range(n):
        for s in SIDES:
            ids, mask = cols[s][i], cols[f"{s}_mask"][i]
            if len(ids) != len(mask) or not any(mask) or mask[0]:
                raise ValueError(f"{path}: pair {i} {s}: scored mask does not fit its tokens")
            out.append((ids, mask))
    return out


def logp_accuracy(logps: list[float]) -> dict[str, float]:
    """Share of pairs (chosen, rejected, chosen, ...) where the chosen completion is more likely."""
    lp = np.asarray(logps, np.float64).reshape(-1, 2)
    return {"pref_logp_accuracy": float(np.mean(lp[:, 0] > lp[:, 1]))}


def reward_metrics(
    policy: list[float] | np.ndarray, reference: list[float] | np.ndarray, beta: float
) -> dict[str, float]:
    """TRL's implicit-reward metrics of a policy against its reference (log-probs chosen, rejected, ...)."""
    r = beta * (np.asarray(policy, np.float64) - np.asarray(reference, np.float64)).reshape(-1, 2)
    return {
        "pref_accuracy": float(np.mean(r[:, 0] > r[:, 1])),
        "pref_margin": float(np.mean(r[:, 0] - r[:, 1])),
    }
