"""Training on a weighted mixture of tokenized sources (``data: {web: 0.7, code: 0.3}``).

Which source each global sample comes from, and which row of it, is a pure function of the weights, the
seed and the sample's index, so a run resumes exactly from its sample count alone, at any world size:

- samples go in blocks of ``BLOCK``; every block holds each source's quota (largest-remainder rounding of
  ``weight x BLOCK``, so the shares are exact per block, off by at most 1/BLOCK from the weights), in an
  order shuffled by ``(seed, block)``;
- source ``s`` reads its rows in epochs, each a permutation seeded by ``(seed, s, epoch)``. A source that
  runs out starts another epoch (``on_exhausted: repeat``, its epoch count is a metric) or ends the run
  (``stop``: ``SourceExhausted``).

Each optimizer step takes the next ``micro_batch x world x accum`` samples, rank ``r`` the ``r``-th
``micro_batch`` of each micro-step's global batch, so a step takes the same rows at any split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stages.lm.data import PackedDataset, model_inputs

BLOCK = 8192


class SourceExhausted(Exception):
    """A mixture source ran out of rows under ``on_exhausted: stop``."""

    def __init__(self, name: str, rows: int):
        super().__init__(f"mixture source {name!r} ran out of rows after {rows} (one epoch); "
                         "on_exhausted: stop ends the run here")
        self.name, self.rows = name, rows


def quotas(weights: list[float], block: int = BLOCK) -> np.ndarray:
    """Samples per block of each source: ``weight x block`` rounded by largest remainder (sums to block);
    every source with a positive weight gets at least one."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    exact = w * block
    q = np.maximum(np.floor(exact).astype(np.int64), (w > 0).astype(np.int64))
    short = block - int(q.sum())
    if short > 0:  # fewer than one per source: the largest fractional parts get one more
        q[np.argsort(-(exact - np.floor(exact)), kind="stable")[:short]] += 1
    for _ in range(-short):  # the minimum of one pushed the sum over: take from the largest
        q[int(np.argmax(q))] -= 1
    return q


class MixturePlan:
    """The (source, row) of any global sample index; see the module docstring."""

    def __init__(self, names: list[str], weights: list[float], sizes: list[int], seed: int,
                 repeat: bool = True, block: int = BLOCK):
        if len(names) != len(weights) or len(names) != len(sizes) or not names:
            raise ValueError("a mixture needs one weight and one size per source")
        if min(sizes) < 1:
            empty = [n for n, s in zip(names, sizes, strict=True) if s < 1]
            raise ValueError(f"mixture sources {empty} have no rows")
        self.names, self.sizes, self.seed, self.repeat, self.block = names, sizes, seed, repeat, block
        self.quota = quotas(weights, block)
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each sample of block ``b``, its rank among that source's samples in the block)."""
        if b not in self._blocks:
            src = np.repeat(np.arange(len(self.quota)), self.quota)
            src = src[np.random.default_rng([self.seed, 0x6D1C, b]).permutation(self.block)]
            rank = np.empty(self.block, np.int64)
            for s in range(len(self.quota)):
                at = np.flatnonzero(src == s)
                rank[at] = np.arange(len(at))
            if len(self._blocks) > 4:
                self._blocks.clear()
            self._blocks[b] = (src, rank)
        return self._blocks[b]

    def positions(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, position in that source's stream) of global samples ``start .. start + n - 1``."""
        idx = np.arange(start, start + n, dtype=np.int64)
        src = np.empty(n, np.int64)
        pos = np.empty(n, np.int64)
        for b in np.unique(idx // self.block):
            sel = idx // self.block == b
            s, r = self._block(int(b))
            j = idx[sel] % self.block
            src[sel] = s[j]
            pos[sel] = b * self.quota[s[j]] + r[j]
        return src, pos

    def row(self, source: int, position: int) -> int:
        """The row of ``source`` at ``position`` of its stream (epoch after epoch)."""
        n = self.sizes[source]
        epoch, i = divmod(int(position), n)
        if epoch and not self.repeat:
            raise SourceExhausted(self.names[source], n)
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 2 * len(self.sizes):
                self._perms.clear()
            self._perms[key] = np.random.default_rng([self.seed, source, epoch]).permutation(n)
        return int(self._perms[key][i])

    def taken(self, samples: int) -> np.ndarray:
        """Samples taken from each source by the first ``samples`` global samples."""
        b, rest = divmod(samples, self.block)
        out = b * self.quota
        if rest:
            src, _ = self._block(b)
            out = out + np.bincount(src[:rest], minlength=len(self.quota))
        return out


def gather(datasets: list[PackedDataset], src: np.ndarray, rows: np.ndarray, doc_mask: bool = False
           ) -> dict[str, torch.Tensor]:
    """Model inputs of row ``rows[j]`` of ``datasets[src[j]]`` for each j, in that order."""
    T = datasets[0].seq_len
    n = len(rows)
    out = (np.empty((n, T + 1), np.int64), np.empty(n, np.int64), np.zeros((n, T), np.int64))
    for s in np.unique(src):
        at = np.flatnonzero(src == s)
        for whole, part in zip(out, datasets[int(s)].raw(rows[at]), strict=True):
            whole[at] = part
    return model_inputs(*out, doc_mask=doc_mask)


class MixtureLoader:
    """Batches of a weighted mixture for one data-parallel rank, forever (the ``Loader`` interface).

    The state is the global sample count (the same on every rank); it resumes at any world size.
    """

    def __init__(self, datasets: dict[str, PackedDataset], weights: dict[str, float], batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, doc_mask: bool = False, accum: int = 1,
                 repeat: bool = True):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size (got {batch_size}, {rank}, "
                             f"{world_size})")
        self.names = list(datasets)
        self.datasets = [datasets[n] for n in self.names]
        lens = {(d.seq_len, d.vocab_size) for d in self.datasets}
        if len(lens) > 1:
            raise ValueError(f"mixture sources differ in sequence length or vocabulary: {lens}")
        self.plan = MixturePlan(self.names, [weights[n] for n in self.names], [len(d) for d in self.datasets],
                                seed, repeat)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.doc_mask, self.repeat = seed, doc_mask, repeat
        self.step_rows = batch_size * world_size * accum
        self.consumed = 0  # global samples taken by all ranks together
        self.last_indices = np.empty(0, np.int64)  # this rank's (source * 2**40 + row) of the latest batch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def next_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(source, row) of this rank's samples of the next micro-batch (advances the position)."""
        start = self.consumed + self.rank * self.batch_size
        src, pos = self.plan.positions(start, self.batch_size)
        if not self.repeat and self.consumed % self.step_rows == 0:
            self._check_step()
        rows = np.array([self.plan.row(int(s), int(p)) for s, p in zip(src, pos, strict=True)], np.int64)
        self.consumed += self.global_batch
        self.last_indices = (src << 40) + rows
        return src, rows

    def _check_step(self) -> None:
        """Under ``stop``: raise ``SourceExhausted`` at the first batch of a step some of whose rows are
        missing; every rank judges the whole global step, so all stop at the same step, before it began."""
        g_src, g_pos = self.plan.positions(self.consumed, self.step_rows)
        for s in np.unique(g_src):
            self.plan.row(int(s), int(g_pos[g_src == s].max()))

    def next_indices(self) -> np.ndarray:
        """Advance one micro-batch without reading data (``train.skip_data``); its encoded rows."""
        self.next_rows()
        return self.last_indices

    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        src, rows = self.next_rows()
        return gather(self.datasets, src, rows, self.doc_mask)

    def metrics(self) -> dict[str, float]:
        """Tokens taken so far from each source (all ranks) and its epochs (passes begun over its rows)."""
        taken = self.plan.taken(self.consumed)
        seq = self.datasets[0].seq_len
        out: dict[str, float] = {}
        for name, n, size in zip(self.names, taken, self.plan.sizes, strict=True):
            out[f"tokens/{name}"] = float(n * seq)
            out[f"epochs/{name}"] = float(n / size)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "seed": self.seed, "sources": self.names,
                "num_samples": [len(d) for d in self.datasets], "quota": self.plan.quota.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was saved (any rank count and batch size: the plan is global)."""
        mine = self.state_dict()
        for key in ("seed", "sources", "num_samples", "quota"):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state has {key}={state.get(key)!r}, this mixture {mine[key]!r}: "
                                 "resuming would not continue the same sample order")
        self.consumed = int(state["consumed"])
