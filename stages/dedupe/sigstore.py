"""Random access to stored signatures and texts, and verification of candidate pairs.

A shard's signatures are one raw little-endian ``uint32`` file of ``rows x num_perm`` values, so any
document's signature is a byte range: memory-mapped locally, ranged reads on object stores. Exact
shingle sets are recomputed from the staged texts (Arrow IPC, memory-mapped) only for the documents
that need them, so nothing but signatures has to be stored per document.

Verification modes:

``estimate``  the fraction of equal signature positions (std ~ sqrt(J(1-J)/num_perm): 0.035 at
              J=0.8 with 128 permutations, so pairs near the threshold go either way);
``exact``     exact Jaccard of the shingle sets, for every candidate;
``hybrid``    the estimate decides when it is farther than ``margin`` from the threshold, exact
              Jaccard decides the rest (the few pairs the estimate cannot call).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import storage
from stages.dedupe.layout import Layout, uid_row, uid_shard


def _read_ranges(path: str, starts: np.ndarray, ends: np.ndarray) -> list[bytes]:
    fs, inner = storage.fs_for(path)
    n = len(starts)
    return fs.cat_ranges([inner] * n, [int(s) for s in starts], [int(e) for e in ends])


class SigStore:
    """Reads signatures and texts of any documents by uid."""

    def __init__(self, out: str, num_perm: int):
        self.layout = Layout(out)
        self.num_perm = num_perm
        self._maps: dict[str, np.ndarray] = {}
        self._docs: dict[int, Any] = {}

    def _local_array(self, path: str) -> np.ndarray | None:
        p = storage.local(path)
        if p is None:
            return None
        if path not in self._maps:
            size = p.stat().st_size
            self._maps[path] = np.memmap(p, dtype=np.uint32, mode="r") if size else np.empty(0, np.uint32)
        return self._maps[path]

    def signatures(self, uids: np.ndarray) -> np.ndarray:
        """``(len(uids), num_perm)`` uint32 signatures, in the order of ``uids``."""
        out = np.empty((len(uids), self.num_perm), dtype=np.uint32)
        shards, rows = uid_shard(uids), uid_row(uids)
        for shard in np.unique(shards):
            sel = np.flatnonzero(shards == shard)
            path = self.layout.sigs(int(shard))
            arr = self._local_array(path)
            if arr is not None:
                out[sel] = arr.reshape(-1, self.num_perm)[rows[sel]]
                continue
            width = 4 * self.num_perm
            blobs = _read_ranges(path, rows[sel] * width, (rows[sel] + 1) * width)
            out[sel] = np.frombuffer(b"".join(blobs), dtype=np.uint32).reshape(-1, self.num_perm)
        return out

    def texts(self, uids: np.ndarray) -> list[str]:
        """Texts of ``uids`` from the staged shard files."""
        from stages.dedupe.tables import read_arrow

        out: list[str] = [""] * len(uids)
        shards, rows = uid_shard(uids), uid_row(uids)
        for shard in np.unique(shards):
            s = int(shard)
            if s not in self._docs:
                self._docs[s] = read_arrow(self.layout.docs(s), ["text"]).column("text")
            sel = np.flatnonzero(shards == shard)
            for i, t in zip(sel, self._docs[s].take(rows[sel]).to_pylist(), strict=True):
                out[i] = t
        return out


class Verifier:
    """Decides whether candidate pairs reach the threshold; caches what it read (one per task)."""

    def __init__(self, out: str, num_perm: int, seed: int, ngram: int, threshold: float, mode: str,
                 margin: float):
        self.store = SigStore(out, num_perm)
        self.num_perm, self.seed, self.ngram = num_perm, seed, ngram
        self.threshold, self.mode, self.margin = threshold, mode, margin
        self.exact_checks = 0

    def exact(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """Exact Jaccard of the shingle sets (the kernel's hashes, as in the signatures) of each pair."""
        from stages.dedupe.minhash import Signer, jaccard_pairs

        uniq, inv = np.unique(np.concatenate([src, dst]), return_inverse=True)
        sets, offsets = Signer(self.num_perm, self.seed, self.ngram).shingle_sets(self.store.texts(uniq))
        return jaccard_pairs(sets, offsets, inv[: len(src)], inv[len(src):])

    def similarity(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """Jaccard (estimated, exact, or estimated then exact near the threshold) of each pair."""
        if len(src) == 0:
            return np.zeros(0, dtype=np.float64)
        if self.mode == "exact":
            need = np.ones(len(src), dtype=bool)
            sim = np.zeros(len(src), dtype=np.float64)
        else:
            uniq, inv = np.unique(np.concatenate([src, dst]), return_inverse=True)
            sigs = self.store.signatures(uniq)
            sim = (sigs[inv[: len(src)]] == sigs[inv[len(src):]]).mean(axis=1)
            if self.mode == "estimate":
                return sim
            need = np.abs(sim - self.threshold) < self.margin
        if need.any():
            idx = np.flatnonzero(need)
            self.exact_checks += len(idx)
            sim[idx] = self.exact(src[idx], dst[idx])
        return sim

    def similar(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """Boolean mask of pairs that reach the threshold."""
        return self.similarity(src, dst) >= self.threshold - 1e-12
