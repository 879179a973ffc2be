"""Reading the tokenize stage's packed shards: a memory-mapped dataset and a resumable batch loader.

``PackedDataset`` maps every shard of a split (``pyarrow.memory_map`` + ``ipc.open_file``: zero copy; the
OS pages tokens in on demand) and views its tokens as a ``(rows, seq_len + 1)`` numpy array. Row ``i``
of the split is row ``i % R`` of shard ``i // R`` (``R = rows_per_shard``): O(1) random access.

``Loader`` walks the rows in a seeded permutation per epoch (or in order), gives each data-parallel rank
its part of every global batch, and yields model batches (the COMMON batch contract):

- ``input_ids`` (B, T) long: ``row[:-1]``
- ``labels`` (B, T) long: ``row[1:]``, already aligned, ``-100`` where the target is padding
- ``position_ids`` (B, T) long: restart at 0 at every document start (and at the row start)
- ``doc_mask`` (B, T) long, on request: segment ids (0 for the document running into the row, +1 at
  each document start), so token i may attend to token j iff j <= i and their segment ids are equal.

Its position is the number of samples of the current epoch consumed by all ranks together, so
``state_dict()`` / ``load_state_dict()`` resume at exactly the next sample, without replay, even with a
different number of ranks or batch size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class _Shard:
    tokens: np.ndarray  # (rows, seq_len + 1), a view of the memory-mapped file
    length: np.ndarray  # (rows,) real tokens per row
    start_offsets: np.ndarray  # (rows + 1,) into start_values
    start_values: np.ndarray  # document start positions, row after row


def _find_manifest(path: str | Path, split: str) -> tuple[Path, str]:
    """Accept the stage directory, its manifest.json, or a split directory (``.../train``)."""
    p = Path(path)
    if p.is_file():
        return p, split
    if (p / "manifest.json").is_file():
        return p / "manifest.json", split
    if (p.parent / "manifest.json").is_file():
        return p.parent / "manifest.json", p.name
    raise FileNotFoundError(f"no manifest.json for {path} (give the tokenize stage directory)")


def _remote_root(path: str) -> str | None:
    """The tokenize stage URL of an object-store ``path`` (stage directory or its manifest.json), or None
    for a local path."""
    if "://" not in path or path.startswith("file://"):
        return None
    path = path.rstrip("/")
    return path[: -len("/manifest.json")] if path.endswith("/manifest.json") else path


def _read_remote_json(url: str) -> dict[str, Any]:
    from pipeline import storage
    from stages.lm.node_cache import IO

    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {url} (give the tokenize stage directory)") from None
    IO["bytes_downloaded"] += len(data)
    return json.loads(data)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _open_shard(path: Path, rows: int, row_len: int, verify_sha: str | None) -> _Shard:
    if verify_sha is not None and _sha256(path) != verify_sha:
        raise ValueError(f"{path}: sha256 differs from the manifest (corrupt or replaced shard)")
    reader = ipc.open_file(pa.memory_map(str(path), "r"))
    if reader.num_record_batches != 1:
        raise ValueError(f"{path}: expected one record batch, found {reader.num_record_batches}")
    batch = reader.get_batch(0)
    if batch.num_rows != rows:
        raise ValueError(f"{path}: {batch.num_rows} rows, manifest says {rows}")
    tok = batch.column("tokens")
    if tok.type.list_size != row_len or tok.offset != 0:
        raise ValueError(f"{path}: rows of {tok.type.list_size} tokens, manifest says {row_len}")
    starts = batch.column("doc_starts")
    offsets = starts.offsets.to_numpy()
    return _Shard(
        tokens=tok.values.to_numpy(zero_copy_only=True).reshape(rows, row_len),
        length=batch.column("length").to_numpy(zero_copy_only=True),
        start_offsets=offsets,
        start_values=starts.values.to_numpy(zero_copy_only=True),
    )


class PackedDataset:
    """One split of a tokenize stage's output, memory-mapped.

    ``path``: the stage directory, its ``manifest.json``, or a split directory (then ``split`` is taken
    from its name). ``verify=True`` checks every shard's sha256 against the manifest (reads all data).
    """

    def __init__(self, path: str | Path, split: str = "train", verify: bool = False):
        self.url = _remote_root(str(path))
        if self.url is not None:  # an object store: shards come through this node's cache, lazily
            manifest_path: Any = f"{self.url}/manifest.json"
            self.root: Any = self.url
            self.manifest: dict[str, Any] = _read_remote_json(manifest_path)
        else:
            manifest_path, split = _find_manifest(path, split)
            self.root = manifest_path.parent
            self.manifest = json.loads(manifest_path.read_text())
        if split not in self.manifest["splits"]:
            raise ValueError(f"{manifest_path}: no split {split!r} (have {sorted(self.manifest['splits'])})")
        self.split = split
        self.seq_len: int = self.manifest["seq_len"]
        self.row_len: int = self.seq_len + 1
        self.rows_per_shard: int = self.manifest["rows_per_shard"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.special_token_ids: dict[str, int] = self.manifest["special_token_ids"]
        self.tokenizer_dir = (f"{self.url}/{self.manifest['tokenizer']}" if self.url is not None
                              else self.root / self.manifest["tokenizer"])
        info = self.manifest["splits"][split]
        shards = info["shards"]
        for k, sh in enumerate(shards[:-1]):
            if sh["rows"] != self.rows_per_shard:
                raise ValueError(f"{sh['path']}: {sh['rows']} rows; every shard but the last has "
                                 f"{self.rows_per_shard} (shard {k})")
        self._entries = shards
        self._shards: list[_Shard | None] = (
            [None] * len(shards) if self.url is not None else
            [_open_shard(self.root / sh["path"], sh["rows"], self.row_len, sh["sha256"] if verify else None)
             for sh in shards])
        self._len = sum(sh["rows"] for sh in shards)
        if self._len != info["rows"]:
            raise ValueError(f"{manifest_path}: shards hold {self._len} rows, split says {info['rows']}")

    def __len__(self) -> int:
        return self._len

    def _shard(self, k: int) -> _Shard:
        """Shard ``k``, memory-mapped; on an object store fetched into the node cache on first use."""
        sh = self._shards[k]
        if sh is None:
            from stages.lm.shard_cache import fetch

            e = self._entries[k]
            sh = fetch(f"{self.url}/{e['path']}", e.get("sha256", ""), int(e.get("bytes", -1)),
                       lambda p: _open_shard(p, e["rows"], self.row_len, None))
            self._shards[k] = sh
        return sh

    def prefetch(self) -> None:
        """Fetch every shard of the split now (a no-op for a local directory)."""
        for k in range(len(self._shards)):
            self._shard(k)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row) of a global row index, in O(1)."""
        if not 0 <= index < self._len:
            raise IndexError(f"row {index} out of range for {self._len} rows")
        return divmod(index, self.rows_per_shard)

    def row(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        """(tokens (seq_len + 1,) view, real length, document start positions) of row ``index``."""
        shard, r = self.locate(index)
        sh = self._shard(shard)
        return sh.tokens[r], int(sh.length[r]), sh.start_values[sh.start_offsets[r]: sh.start_offsets[r + 1]]

    def batch(self, indices: np.ndarray | list[int], doc_mask: bool = False) -> dict[str, torch.Tensor]:
        """Model inputs for the given rows (see the module docstring)."""
        return model_inputs(*self.raw(indices), doc_mask=doc_mask)

    def raw(self, indices: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows (n, seq_len + 1), real lengths (n,), document-start marks (n, seq_len)) of the given rows;
        a mark at each document start s holds s, else 0."""
        idx = np.asarray(indices, dtype=np.int64)
        n, T = len(idx), self.seq_len
        if n and (idx.min() < 0 or idx.max() >= self._len):
            raise IndexError(f"row indices must be in [0, {self._len})")
        rows = np.empty((n, self.row_len), np.int64)
        length = np.empty(n, np.int64)
        marks = np.zeros((n, T), np.int64)
        shard_of, row_of = np.divmod(idx, self.rows_per_shard)
        for j in range(n):
            sh = self._shard(shard_of[j])
            r = row_of[j]
            rows[j] = sh.tokens[r]
            length[j] = sh.length[r]
            starts = sh.start_values[sh.start_offsets[r]: sh.start_offsets[r + 1]]
            marks[j, starts] = starts
        return rows, length, marks


def model_inputs(rows: np.ndarray, length: np.ndarray, marks: np.ndarray, doc_mask: bool = False
                 ) -> dict[str, torch.Tensor]:
    """``input_ids``/``labels``/``position_ids`` (and ``doc_mask``) of raw rows (``PackedDataset.raw``)."""
    T = marks.shape[1]
    t = np.arange(T, dtype=np.int64)
    labels = rows[:, 1:].copy()
    labels[t[None, :] >= (length - 1)[:, None]] = IGNORE_INDEX
    out = {
        "input_ids": torch.from_numpy(np.ascontiguousarray(rows[:, :-1])),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(t[None, :] - np.maximum.accumulate(marks, axis=1)),
    }
    if doc_mask:
        out["doc_mask"] = torch.from_numpy(np.cumsum(marks > 0, axis=1, dtype=np.int64))
    return out


class Loader:
    """Batches of ``dataset`` for one data-parallel rank, forever, epoch after epoch.

    Each step takes the next ``batch_size * world_size`` samples of the epoch's order (a permutation seeded
    by ``(seed, epoch)`` when ``shuffle``, else row order); rank ``r`` gets the ``r``-th ``batch_size``
    of them. With ``drop_last`` the samples that do not fill a global batch are skipped that epoch (a
    different set each epoch when shuffling); without it the epoch's last step is split as evenly as
    possible (ranks differ by at most one sample; a rank may get an empty batch when fewer samples than
    ranks remain), so every sample is seen exactly once: use that for validation.

    With ``drop_last`` an epoch ends only between optimizer steps of ``accum`` batches: whether a step of
    ``batch_size * world_size * accum`` rows still fits is judged at its first batch, so the same step
    split over another number of ranks (and a matching ``accum``) takes exactly the same rows.

    ``epoch_batches()`` yields the rest of the current epoch (a full pass on a fresh loader). The state
    (``epoch``, ``consumed``) is the same on every rank; saving rank 0's is enough, and it resumes at any
    world size.
    """

    def __init__(self, dataset: PackedDataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, doc_mask: bool = False, drop_last: bool = True,
                 accum: int = 1):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size (got {batch_size}, {rank}, "
                             f"{world_size})")
        if len(dataset) == 0 or (drop_last and len(dataset) < batch_size * world_size * accum):
            raise ValueError(f"{dataset.split}: {len(dataset)} rows, fewer than one optimizer step of "
                             f"{batch_size * world_size * accum} (batch x ranks x accumulation); lower the "
                             "batch size or set drop_last=False")
        self.dataset = dataset
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.doc_mask, self.drop_last = seed, shuffle, doc_mask, drop_last
        self.step_rows = batch_size * world_size * accum  # rows of one optimizer step
        self.last_indices = np.empty(0, np.int64)  # this rank's rows of the latest batch (for tracing)
        self.epoch = 0
        self.consumed = 0  # samples of this epoch taken by all ranks together
        self._order_epoch: int | None = None
        self._order = np.empty(0, np.int64)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        n, g = len(self.dataset), self.global_batch
        return n // g if self.drop_last else -(-n // g)

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (the same on every rank)."""
        if self._order_epoch != epoch:
            n = len(self.dataset)
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                           else np.arange(n, dtype=np.int64))
            self._order_epoch = epoch
        return self._order

    def _exhausted(self) -> bool:
        left = len(self.dataset) - self.consumed
        at_step_start = self.consumed % self.step_rows == 0
        return left == 0 or (self.drop_last and at_step_start and left < self.step_rows)

    def next_indices(self) -> np.ndarray:
        """This rank's row indices of the next step (advances the position)."""
        if self._exhausted():
            self.epoch += 1
            self.consumed = 0
        take = min(self.global_batch, len(self.dataset) - self.consumed)
        step = self.order(self.epoch)[self.consumed: self.consumed + take]
        self.consumed += take
        if take == self.global_batch:
            self.last_indices = step[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]
        else:
            self.last_indices = np.array_split(step, self.world_size)[self.rank]
        return self.last_indices

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.dataset.batch(self.next_indices(), doc_mask=self.doc_mask)

    def epoch_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The remaining batches of the current epoch (all of the next one if this one is finished)."""
        if self._exhausted():
            self.epoch += 1
            self.consumed = 0
        while not self._exhausted():
            yield next(self)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "shuffle": self.shuffle,
                "num_samples": len(self.dataset), "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was saved (any rank count and batch size: the order is global)."""
        for key, mine in (("num_samples", len(self.dataset)), ("seed", self.seed), ("shuffle", self.shuffle)):
            if state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader {mine!r}: "
                                 f"resuming would not continue the same sample order")
        if not 0 <= state["consumed"] <= len(self.dataset):
            raise ValueError(f"loader state consumed={state['consumed']} out of range")
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
