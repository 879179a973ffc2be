"""Preference pairs: reading with quarantine, ChatML tokenization with completion masks, batches.

Records are TRL's preference format, one JSON object per line (JSONL, .gz/.zst or Parquet):

- ``{"prompt": str, "chosen": str, "rejected": str}``: rendered as one user turn answered by one
  assistant turn, exactly as the sft stage renders ``{"prompt", "completion"}`` records;
- ``{"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]}``.

Each side (prompt + chosen, prompt + rejected) is rendered with the sft stage's ChatML renderer
(``stages.sft.chat``) and tokenized as one text, so the ids are what the sft model was trained on. A
token is scored iff it starts inside a completion message's content or is the ``<|im_end|>`` closing
it; prompt tokens (earlier assistant turns included) and template glue are not. A bad record (not
JSON, missing or mistyped fields, bad roles, control tokens in content, chosen identical to
rejected) is quarantined with the reason.

Lengths: the prompt (the tokens before the first scored token) keeps its last ``max_prompt_len``
tokens; then the sequence keeps its first ``max_len`` tokens. Both are counted in the stats.

Tokenized pairs are stored as one Arrow IPC file per split (``pairs/<split>.arrow``: ``id``,
``chosen``, ``chosen_mask``, ``rejected``, ``rejected_mask``). ``PairData`` builds model batches from
it: a micro-batch of B pairs is one (2B, T) tensor, the B chosen sequences then the B rejected ones,
right-padded to ``T`` = the batch's longest sequence rounded up to a multiple of ``PAD_MULTIPLE``
(never to ``max_len``: real pairs are far shorter). The rounding keeps every row's log-probabilities
bitwise identical whatever batch it lands in: CPU kernels (attention's key loop, the sums over T) then
never run a partial vector tail, so the reference pass and training, which batch pairs differently,
give identical values in both reference modes (tested).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline import storage
from stages.common.records import Record, RecordReader, Reject, expand_inputs
from stages.sft.chat import BadRecord, Message, render, to_messages

IGNORE_INDEX = -100
PAD_MULTIPLE = 16  # the float32 vector width of AVX-512: no partial vector tail in any CPU kernel
SIDES = ("chosen", "rejected")


@dataclass(frozen=True)
class Pair:
    """A good preference pair as two conversations, and how many prompt messages they start with."""

    id: str
    chosen: list[Message]
    rejected: list[Message]
    n_prompt: int

    def key(self) -> bytes:
        return json.dumps([self.chosen, self.rejected], ensure_ascii=False, sort_keys=True).encode()


def to_pair(obj: dict[str, Any], pair_id: str) -> Pair:
    """A record -> ``Pair``; raises ``BadRecord`` with the reason."""
    for name in ("prompt", *SIDES):
        if name not in obj:
            raise BadRecord(f"missing field {name!r} (a preference record has prompt, chosen, rejected)")
    sides = {}
    for side in SIDES:
        try:
            sides[side] = to_messages({"prompt": obj["prompt"], "completion": obj[side]})
        except BadRecord as e:
            raise BadRecord(f"{side}: {e}") from None
    if sides["chosen"] == sides["rejected"]:
        raise BadRecord("chosen and rejected are identical (the pair carries no preference)")
    n_prompt = len(obj["prompt"]) if isinstance(obj["prompt"], list) else 1
    return Pair(pair_id, sides["chosen"], sides["rejected"], n_prompt)


class PairReader(RecordReader):
    """A ``RecordReader`` whose records are preference pairs (``Record.fields["pair"]``)."""

    def _record(self, obj: dict[str, Any], line_no: int, raw: bytes) -> Record | None:
        pair_id = f"{self.id_prefix}:{line_no}"
        try:
            pair = to_pair(obj, pair_id)
        except BadRecord as e:
            self._reject(line_no, str(e), raw or json.dumps(obj, ensure_ascii=False).encode())
            return None
        return Record(line_no, pair_id, "", {"pair": pair})


def read_pairs(patterns: str | list[str], field_path: str,
               on_reject: Callable[[Reject], None]) -> tuple[list[Pair], int]:
    """Good pairs of the files matched by ``patterns`` (file, then line order) and the records seen."""
    pairs: list[Pair] = []
    seen = 0
    for f in expand_inputs(patterns, field_path):
        reader = PairReader(f.path, id_prefix=f.rel, on_reject=on_reject)
        pairs += [rec.fields["pair"] for rec in reader]
        seen += reader.lines
    return pairs, seen


def is_val(pair: Pair, fraction: float) -> bool:
    """Held out iff a hash of the pair's content is below ``fraction`` (stable under reordering)."""
    if fraction <= 0:
        return False
    return int.from_bytes(hashlib.sha256(pair.key()).digest()[:8], "big") < fraction * 2**64


@dataclass
class EncodeStats:
    """Per-split counts of what tokenization did."""

    pairs: int = 0
    truncated_prompts: int = 0
    truncated_completions: int = 0
    tokens: int = 0
    max_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _completion_spans(messages: list[Message], n_prompt: int) -> tuple[str, list[tuple[int, int]]]:
    """ChatML text and the character spans scored: only the completion's assistant messages."""
    text, spans = render(messages)
    prompt_assistants = sum(m["role"] == "assistant" for m in messages[:n_prompt])
    return text, spans[prompt_assistants:]


def _scored(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    starts = np.fromiter((s for s, _ in offsets), np.int64, len(offsets))
    keep = np.zeros(len(offsets), bool)
    for a, b in spans:
        keep |= (starts >= a) & (starts < b)
    return keep


@dataclass
class PairEncoder:
    """Tokenizes pairs (a ``tokenizers.Tokenizer``) and applies the length limits."""

    tokenizer: Any
    max_len: int
    max_prompt_len: int
    stats: EncodeStats = field(default_factory=EncodeStats)

    def _fit(self, ids: np.ndarray, scored: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool, bool]:
        first = int(np.argmax(scored))  # tokens before the first scored one are the prompt
        cut_prompt = first > self.max_prompt_len
        if cut_prompt:
            drop = first - self.max_prompt_len
            ids, scored = ids[drop:], scored[drop:]
        cut_completion = len(ids) > self.max_len
        return ids[: self.max_len], scored[: self.max_len], cut_prompt, cut_completion

    def encode(self, pairs: list[Pair]) -> list[dict[str, Any]]:
        """Rows for ``pairs``: ``id`` and per side the int32 ids and bool scored-token mask."""
        texts, spans = [], []
        for p in pairs:
            for msgs in (p.chosen, p.rejected):
                t, s = _completion_spans(msgs, p.n_prompt)
                texts.append(t)
                spans.append(s)
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        rows = []
        for i, p in enumerate(pairs):
            row: dict[str, Any] = {"id": p.id}
            cut_p = cut_c = False
            for j, side in enumerate(SIDES):
                e = encs[2 * i + j]
                scored = _scored(e.offsets, spans[2 * i + j])
                ids, scored, cp, cc = self._fit(np.asarray(e.ids, np.int32), scored)
                row[side], row[f"{side}_mask"] = ids, scored
                cut_p, cut_c = cut_p or cp, cut_c or cc
                self.stats.tokens += len(ids)
                self.stats.max_tokens = max(self.stats.max_tokens, len(ids))
            self.stats.pairs += 1
            self.stats.truncated_prompts += cut_p
            self.stats.truncated_completions += cut_c
            rows.append(row)
        return rows


def to_arrow_bytes(rows: list[dict[str, Any]]) -> bytes:
    """Tokenized rows -> an Arrow IPC file (bytes)."""
    cols: dict[str, pa.Array] = {"id": pa.array([r["id"] for r in rows], pa.string())}
    for side in SIDES:
        cols[side] = pa.array([r[side] for r in rows], pa.list_(pa.int32()))
        cols[f"{side}_mask"] = pa.array([r[f"{side}_mask"] for r in rows], pa.list_(pa.bool_()))
    table = pa.table(cols)
    sink = io.BytesIO()
    with ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


class PairData:
    """A split's tokenized pairs in memory, turned into model batches (see the module docstring).

    ``ref`` (N, 2) float32 holds the reference log-probabilities (chosen, rejected) when they were
    precomputed; batches then carry them as ``ref_logps``.
    """

    def __init__(self, data: bytes, max_len: int, pad_id: int, ref: np.ndarray | None = None):
        table = ipc.open_file(pa.BufferReader(data)).read_all()
        self.ids: list[str] = table.column("id").to_pylist()
        self.max_len, self.pad_id = max_len, pad_id
        self._seqs = {}
        for side in SIDES:
            col, mask = table.column(side).combine_chunks(), table.column(f"{side}_mask").combine_chunks()
            self._seqs[side] = (col.offsets.to_numpy(), col.values.to_numpy(),
                                mask.values.to_numpy(zero_copy_only=False))
        if ref is not None and ref.shape != (len(self), 2):
            raise ValueError(f"reference log-probs have shape {ref.shape}, expected ({len(self)}, 2)")
        self.ref = ref

    @classmethod
    def load(cls, path: str, max_len: int, pad_id: int, ref: np.ndarray | None = None) -> PairData:
        return cls(storage.read_bytes(path), max_len, pad_id, ref)

    def __len__(self) -> int:
        return len(self.ids)

    def sequence(self, side: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scored mask) of pair ``i``'s chosen or rejected sequence."""
        off, vals, mask = self._seqs[side]
        return vals[off[i]: off[i + 1]], mask[off[i]: off[i + 1]]

    def length(self, side: str, i: int) -> int:
        off = self._seqs[side][0]
        return int(off[i + 1] - off[i])

    def width(self, idx: list[int]) -> int:
        """``T`` of a batch of pairs ``idx``: the longest sequence rounded up to ``PAD_MULTIPLE``."""
        longest = max((self.length(side, i) for side in SIDES for i in idx), default=1)
        return -(-max(longest, 1) // PAD_MULTIPLE) * PAD_MULTIPLE

    def batch(self, indices: np.ndarray | list[int]) -> dict[str, Any]:
        """A (2B, T) batch (``width``): rows 0..B-1 chosen, B..2B-1 rejected (COMMON batch contract)."""
        import torch

        idx = [int(i) for i in indices]
        B, T = len(idx), self.width(idx)
        ids = np.full((2 * B, T), self.pad_id, np.int64)
        labels = np.full((2 * B, T), IGNORE_INDEX, np.int64)
        for s, side in enumerate(SIDES):
            for b, i in enumerate(idx):
                seq, scored = self.sequence(side, i)
                r, n = s * B + b, len(seq)
                ids[r, :n] = seq
                # labels[t] is the target of position t: token t + 1, when that token is scored.
                labels[r, : n - 1] = np.where(scored[1:], seq[1:], IGNORE_INDEX)
        out = {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.arange(T, dtype=torch.long).expand(2 * B, T).contiguous(),
            "pair_index": torch.tensor(idx, dtype=torch.long),
        }
        if self.ref is not None:
            ref = np.concatenate([self.ref[idx, 0], self.ref[idx, 1]]).astype(np.float32)
            out["ref_logps"] = torch.from_numpy(ref)
        return out


class PairLoader:
    """Endless training batches of one data-parallel rank, epoch after epoch.

    Every step takes the next ``batch_size * world_size`` pairs of the epoch's order (a permutation
    seeded by ``(seed, epoch)``); rank ``r`` gets the ``r``-th ``batch_size`` of them; pairs left over at
    an epoch's end (fewer than a global batch) are skipped that epoch. ``state_dict()`` is the same on
    every rank and resumes at exactly the next batch.
    """

    def __init__(self, data: PairData, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 accum: int = 1):
        self.step_rows = batch_size * world_size * accum  # pairs of one optimizer step
        if self.step_rows > len(data):
            raise ValueError(f"{len(data)} training pairs, fewer than one optimizer step of {self.step_rows} "
                             "(micro_batch x workers x accumulation); lower the batch size")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.consumed = 0, 0
        self.last_indices = np.empty(0, np.int64)  # this rank's pairs of the latest batch (for tracing)

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.data))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        gb = self.batch_size * self.world_size
        # an epoch ends between optimizer steps only, so a step takes the same pairs at any world size
        if self.consumed % self.step_rows == 0 and self.consumed + self.step_rows > len(self.data):
            self.epoch, self.consumed = self.epoch + 1, 0
        start = self.consumed + self.rank * self.batch_size
        idx = self._order()[start: start + self.batch_size]
        self.consumed += gb
        self.last_indices = idx
        return self.data.batch(idx)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


def val_batches(data: PairData, rank: int, world_size: int, batch_size: int,
                limit: int | None = None) -> list[dict[str, Any]]:
    """Deterministic held-out batches of one rank, in order. Every rank gets the same number of batches
    of the same sizes (collective forward passes stay in step): pairs ``0 .. N - N % world_size - 1``
    are dealt out contiguously, at most ``world_size - 1`` pairs are left out."""
    per_rank = len(data) // world_size
    mine = np.arange(rank * per_rank, (rank + 1) * per_rank)
    chunks = [mine[s: s + batch_size] for s in range(0, per_rank, batch_size)]
    if limit is not None:
        chunks = chunks[:limit]
    return [data.batch(c) for c in chunks]
