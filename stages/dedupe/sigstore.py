"""Random access to stored signatures and shingle sets, and pair verification.

A shard's signatures are one raw little-endian ``uint32`` file of ``rows x num_perm`` values, so any
document's signature is a byte range: memory-mapped locally, ranged reads on object stores. Shingle
sets (only written for ``verify: exact``) are sorted unique ``uint32`` hashes, concatenated, with an
``int64`` offsets file.
"""

from __future__ import annotations

import numpy as np

from pipeline import storage
from stages.dedupe.layout import Layout, uid_row, uid_shard


def _read_ranges(path: str, starts: np.ndarray, ends: np.ndarray) -> list[bytes]:
    fs, inner = storage.fs_for(path)
    n = len(starts)
    return fs.cat_ranges([inner] * n, [int(s) for s in starts], [int(e) for e in ends])


class SigStore:
    """Reads signatures (and shingle sets) of any documents by uid."""

    def __init__(self, out: str, num_perm: int):
        self.layout = Layout(out)
        self.num_perm = num_perm
        self._maps: dict[str, np.ndarray] = {}

    def _local_array(self, path: str, dtype: type) -> np.ndarray | None:
        p = storage.local(path)
        if p is None:
            return None
        if path not in self._maps:
            self._maps[path] = np.memmap(p, dtype=dtype, mode="r") if p.stat().st_size else np.empty(0, dtype)
        return self._maps[path]

    def signatures(self, uids: np.ndarray) -> np.ndarray:
        """``(len(uids), num_perm)`` uint32 signatures, in the order of ``uids``."""
        out = np.empty((len(uids), self.num_perm), dtype=np.uint32)
        shards = uid_shard(uids)
        rows = uid_row(uids)
        for shard in np.unique(shards):
            sel = np.flatnonzero(shards == shard)
            path = self.layout.sigs(int(shard))
            arr = self._local_array(path, np.uint32)
            if arr is not None:
                out[sel] = arr.reshape(-1, self.num_perm)[rows[sel]]
                continue
            width = 4 * self.num_perm
            blobs = _read_ranges(path, rows[sel] * width, (rows[sel] + 1) * width)
            out[sel] = np.frombuffer(b"".join(blobs), dtype=np.uint32).reshape(-1, self.num_perm)
        return out

    def shingle_sets(self, uids: np.ndarray) -> list[np.ndarray]:
        """Sorted unique shingle hashes of each document, in the order of ``uids``."""
        out: list[np.ndarray] = [np.empty(0, np.uint32)] * len(uids)
        shards = uid_shard(uids)
        rows = uid_row(uids)
        for shard in np.unique(shards):
            sel = np.flatnonzero(shards == shard)
            idx_path = self.layout.shingle_index(int(shard))
            data_path = self.layout.shingles(int(shard))
            idx = self._local_array(idx_path, np.int64)
            data = self._local_array(data_path, np.uint32)
            if idx is None or data is None:
                starts_b = _read_ranges(idx_path, rows[sel] * 8, rows[sel] * 8 + 16)
                bounds = np.frombuffer(b"".join(starts_b), dtype=np.int64).reshape(-1, 2)
                blobs = _read_ranges(data_path, bounds[:, 0] * 4, bounds[:, 1] * 4)
                for j, i in enumerate(sel):
                    out[i] = np.frombuffer(blobs[j], dtype=np.uint32)
                continue
            for i, r in zip(sel, rows[sel], strict=False):
                out[i] = np.asarray(data[idx[r] : idx[r + 1]])
        return out


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fraction of equal signature positions, row by row."""
    return (a == b).mean(axis=1)


def exact_jaccard(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(a), dtype=np.float64)
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        inter = np.intersect1d(x, y, assume_unique=True).size
        union = x.size + y.size - inter
        out[i] = inter / union if union else 1.0
    return out


def similar(store: SigStore, src: np.ndarray, dst: np.ndarray, threshold: float, verify: str) -> np.ndarray:
    """Boolean mask of pairs whose (estimated or exact) Jaccard reaches ``threshold``."""
    if len(src) == 0:
        return np.zeros(0, dtype=bool)
    uniq, inv = np.unique(np.concatenate([src, dst]), return_inverse=True)
    isrc, idst = inv[: len(src)], inv[len(src):]
    if verify == "exact":
        sets = store.shingle_sets(uniq)
        sim = exact_jaccard([sets[i] for i in isrc], [sets[i] for i in idst])
    else:
        sigs = store.signatures(uniq)
        sim = estimated_jaccard(sigs[isrc], sigs[idst])
    return sim >= threshold - 1e-12
