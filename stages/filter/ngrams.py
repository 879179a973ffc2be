"""Vectorised substring keys for repetition statistics.

Equality of n-grams (strings of joined words) is decided on 64-bit keys: a polynomial hash of the
string's code points (mod 2**64, computed for all substrings at once from one prefix sum) mixed with the
string's length. Counting duplicates then takes ``numpy.unique`` instead of building and hashing one
Python string per n-gram position; the one sequential scan (Gopher's greedy duplicate walk) is a numba loop.
"""

from __future__ import annotations

import numba
import numpy as np

_BASE = 0x100000001B3  # odd: invertible modulo 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)
_LEN_MIX = np.uint64(0x9E3779B97F4A7C15)
_pow_cache: dict[str, np.ndarray] = {}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**i and BASE**-i (mod 2**64) for i < n, grown on demand."""
    have = _pow_cache.get("fwd")
    if have is None or len(have) < n:
        size = max(n, 1 << 16, 2 * (0 if have is None else len(have)))
        with np.errstate(over="ignore"):
            fwd = np.cumprod(np.full(size, _BASE, np.uint64), dtype=np.uint64)
            inv = np.cumprod(np.full(size, _BASE_INV, np.uint64), dtype=np.uint64)
        _pow_cache["fwd"] = np.concatenate([[np.uint64(1)], fwd[:-1]])
        _pow_cache["inv"] = np.concatenate([[np.uint64(1)], inv[:-1]])
    return _pow_cache["fwd"], _pow_cache["inv"]


def substring_keys(s: str, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """A 64-bit key per substring ``s[starts[i]:ends[i]]``; equal substrings get equal keys."""
    cps = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64) + np.uint64(1)
    fwd, inv = _powers(len(cps) + 1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(cps) + 1, np.uint64)
        np.cumsum(cps * inv[: len(cps)], dtype=np.uint64, out=prefix[1:])
        h = (prefix[ends] - prefix[starts]) * fwd[starts]
        return h ^ ((ends - starts).astype(np.uint64) * _LEN_MIX)


class WordGrams:
    """Word n-grams of one document, as Gopher's rules join them (with and without spaces)."""

    def __init__(self, words: list[str]):
        self.n_words = len(words)
        lens = np.fromiter((len(w) for w in words), np.int64, len(words))
        self.lens = lens
        self.spaced = " ".join(words)
        self.sp_start = np.concatenate([[0], np.cumsum(lens + 1)[:-1]]) if len(words) else lens
        self.glued = "".join(words)
        self.gl_start = np.concatenate([[0], np.cumsum(lens)])

    def top_ngram_chars(self, n: int) -> int | None:
        """Characters of the most frequent space-joined n-gram times its count (first seen on ties);
        None when the document has fewer than n words."""
        m = self.n_words - n + 1
        if m <= 0:
            return None
        starts = self.sp_start[:m]
        ends = self.sp_start[n - 1:] + self.lens[n - 1:]
        keys = substring_keys(self.spaced, starts, ends)
        _, first, counts = np.unique(keys, return_index=True, return_counts=True)
        top = counts.max()
        i = int(first[counts == top].min())
        return int(ends[i] - starts[i]) * int(top)

    def duplicate_ngram_chars(self, n: int) -> int:
        """Characters of repeated n-grams (words glued without spaces), greedy left to right: a repeat
        counts its characters and skips its n words."""
        m = self.n_words - n + 1
        if m <= 0:
            return 0
        starts, ends = self.gl_start[:m], self.gl_start[n:]
        keys = substring_keys(self.glued, starts, ends)
        uniq, ids = np.unique(keys, return_inverse=True)
        if len(uniq) == m:
            return 0
        return int(_greedy_duplicates(ids.astype(np.int64), ends - starts, n, len(uniq)))


@numba.njit(cache=True)
def _greedy_duplicates(ids, lens, n, n_ids):  # pragma: no cover - compiled
    seen = np.zeros(n_ids, np.bool_)
    total = 0
    i = 0
    while i < len(ids):
        if seen[ids[i]]:
            total += lens[i]
            i += n
        else:
            seen[ids[i]] = True
            i += 1
    return total


def duplicates(items: list[str]) -> tuple[int, int]:
    """(repeated items, characters in repeated items), every occurrence after the first counted."""
    seen: set[str] = set()
    count = chars = 0
    for x in items:
        if x in seen:
            count += 1
            chars += len(x)
        else:
            seen.add(x)
    return count, chars
