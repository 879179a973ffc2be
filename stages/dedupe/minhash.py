"""Text normalisation, shingle hashing and MinHash signatures, computed in compiled batches.

One pass of a Numba kernel over a batch of normalised documents splits words, hashes them, forms word
n-gram shingle hashes and applies the ``num_perm`` permutations of datasketch's default ``affine32``
scheme (``a * fmix32(h) + b`` mod 2^32, min over shingles). The inner permutation loop is 32-bit
multiply-add-min over a contiguous array, which LLVM vectorises; that is where the speed over
per-document ``MinHash.update_batch`` (a Python hash call per shingle, then numpy temporaries) comes
from.

Parity contract: for a document ``text``, ``Signer(num_perm, seed, ngram).sign([text]).sigs[0]`` equals
``datasketch.MinHash(num_perm, seed, hashfunc=shingle_hash)`` updated with ``shingles(text, ngram)``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numba
import numpy as np
import xxhash

# Whitespace that survives NFKC but is not ASCII (NFKC maps the other Unicode spaces to " "). Replacing
# these by " " makes "split on ASCII whitespace" (the kernel) equal to Python's ``str.split()``.
_UNICODE_SPACES = re.compile("[\x85\u1680\u2028\u2029]")

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_SHINGLE_MUL = np.uint64(0x9E3779B97F4A7C15)
_MASK32 = np.uint64(0xFFFFFFFF)
EMPTY_HASH = np.uint32(0xFFFFFFFF)  # signature value of an empty set (datasketch's sentinel)


def normalize(text: str) -> str:
    """NFKC, case-fold, and turn every whitespace character into one an ASCII splitter sees."""
    t = unicodedata.normalize("NFKC", text).casefold()
    if not t.isascii():
        t = _UNICODE_SPACES.sub(" ", t)
    return t


def words(text: str) -> list[str]:
    """The words of a document: its normalised text split on whitespace."""
    return normalize(text).split()


def shingles(text: str, ngram: int) -> list[bytes]:
    """Reference (pure Python) word n-gram shingles: ``"w1 w2 ... wn"`` as UTF-8 bytes.

    A document with fewer than ``ngram`` words has one shingle made of all its words; an empty one has
    none. Used by tests and the benchmark's ground truth; the stage computes the same in the kernel.
    """
    w = words(text)
    if not w:
        return []
    k = max(1, len(w) - ngram + 1)
    return [" ".join(w[i : i + ngram]).encode("utf-8") for i in range(k)]


# ---------------------------------------------------------------------------------------------------
# Compiled kernels. Integer arithmetic is uint64 with wrap-around; 32-bit values are masked explicitly.


@numba.njit(cache=True, inline="always")
def _fmix64(h):
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


@numba.njit(cache=True, inline="always")
def _fmix32(h):
    # MurmurHash3's 32-bit finalizer, as datasketch applies it to every hashfunc output.
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(16)
    return h


@numba.njit(cache=True, inline="always")
def _is_space(c):
    return c == 32 or (9 <= c <= 13) or (28 <= c <= 31)


@numba.njit(cache=True)
def _split_words(buf, start, end, word_hashes, collapsed, cpos):
    """Hash the words of ``buf[start:end]`` (FNV-1a 64 + fmix64) and copy them, single-space joined,
    to ``collapsed`` from ``cpos``. Returns (number of words, new cpos)."""
    n = 0
    i = start
    while i < end:
        while i < end and _is_space(buf[i]):
            i += 1
        if i >= end:
            break
        if n > 0:
            collapsed[cpos] = 32
            cpos += 1
        h = np.uint64(0xCBF29CE484222325)
        while i < end and not _is_space(buf[i]):
            h = (h ^ np.uint64(buf[i])) * np.uint64(0x100000001B3)
            collapsed[cpos] = buf[i]
            cpos += 1
            i += 1
        word_hashes[n] = _fmix64(h)
        n += 1
    return n, cpos


@numba.njit(cache=True, inline="always")
def _shingle_hash(word_hashes, start, stop):
    h = np.uint64(0)
    for k in range(start, stop):
        h = (h ^ word_hashes[k]) * np.uint64(0x9E3779B97F4A7C15)
    return _fmix64(h) >> np.uint64(32)


@numba.njit(cache=True)
def _hash_shingle_bytes(buf):
    word_hashes = np.empty(buf.shape[0] // 2 + 1, dtype=np.uint64)
    collapsed = np.empty(buf.shape[0], dtype=np.uint8)
    n, _ = _split_words(buf, 0, buf.shape[0], word_hashes, collapsed, 0)
    return _shingle_hash(word_hashes, 0, n)


@numba.njit(cache=True)
def _sign_batch(buf, offsets, ngram, a, b, sigs, collapsed, coffsets):
    """Signatures of every document ``buf[offsets[i]:offsets[i+1]]`` into ``sigs[i]``.

    Also writes each document's collapsed text (words joined by one space) to ``collapsed`` at
    ``coffsets[i]``, for the exact-duplicate hash.
    """
    ndocs = offsets.shape[0] - 1
    num_perm = a.shape[0]
    max_len = 0
    for d in range(ndocs):
        max_len = max(max_len, offsets[d + 1] - offsets[d])
    word_hashes = np.empty(max_len // 2 + 1, dtype=np.uint64)
    vals = np.empty(num_perm, dtype=np.uint32)
    cpos = 0
    for d in range(ndocs):
        coffsets[d] = cpos
        nw, cpos = _split_words(buf, offsets[d], offsets[d + 1], word_hashes, collapsed, cpos)
        for p in range(num_perm):
            vals[p] = np.uint32(0xFFFFFFFF)
        nsh = 0 if nw == 0 else max(1, nw - ngram + 1)
        for s in range(nsh):
            x = np.uint32(_fmix32(_shingle_hash(word_hashes, s, min(s + ngram, nw))))
            for p in range(num_perm):  # 32-bit multiply-add-min: vectorised by LLVM
                vals[p] = min(vals[p], np.uint32(a[p] * x + b[p]))
        sigs[d, :] = vals
    coffsets[ndocs] = cpos


@numba.njit(cache=True)
def _shingle_hashes_batch(buf, offsets, ngram):
    """Shingle hashes of every document (unsorted, with repeats), concatenated, and their offsets."""
    ndocs = offsets.shape[0] - 1
    max_len = 0
    for d in range(ndocs):
        max_len = max(max_len, offsets[d + 1] - offsets[d])
    word_hashes = np.empty(max_len // 2 + 1, dtype=np.uint64)
    collapsed = np.empty(max_len + 1, dtype=np.uint8)
    out = np.empty(buf.shape[0] // 2 + ndocs, dtype=np.uint32)  # at most one shingle per word
    out_off = np.zeros(ndocs + 1, dtype=np.int64)
    pos = 0
    for d in range(ndocs):
        nw, _ = _split_words(buf, offsets[d], offsets[d + 1], word_hashes, collapsed, 0)
        nsh = 0 if nw == 0 else max(1, nw - ngram + 1)
        for s in range(nsh):
            out[pos + s] = np.uint32(_shingle_hash(word_hashes, s, min(s + ngram, nw)))
        pos += nsh
        out_off[d + 1] = pos
    return out[:pos], out_off


@numba.njit(cache=True)
def jaccard_pairs(data, offsets, ia, ib):
    """Exact Jaccard of pairs of sorted unique sets stored as ``data[offsets[i]:offsets[i+1]]``."""
    out = np.empty(ia.shape[0], dtype=np.float64)
    for k in range(ia.shape[0]):
        i, j = offsets[ia[k]], offsets[ib[k]]
        ie, je = offsets[ia[k] + 1], offsets[ib[k] + 1]
        size = (ie - i) + (je - j)
        inter = 0
        while i < ie and j < je:
            if data[i] == data[j]:
                inter += 1
                i += 1
                j += 1
            elif data[i] < data[j]:
                i += 1
            else:
                j += 1
        union = size - inter
        out[k] = inter / union if union > 0 else 1.0
    return out


def shingle_hash(shingle: bytes | str) -> int:
    """The 32-bit hash of one shingle (``"w1 w2 ... wn"``), usable as datasketch's ``hashfunc``.

    Words are hashed with FNV-1a 64 and fmix64, combined in order, and the top 32 bits are taken.
    """
    data = shingle.encode("utf-8") if isinstance(shingle, str) else bytes(shingle)
    return int(_hash_shingle_bytes(np.frombuffer(data, dtype=np.uint8)))


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutation parameters (a, b) for ``(num_perm, seed)``, as uint32."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return np.ascontiguousarray(a, dtype=np.uint32), np.ascontiguousarray(b, dtype=np.uint32)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised UTF-8 of all texts in one buffer, and the (n+1) offsets of each."""
    encoded = [normalize(t).encode("utf-8") for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


@dataclass
class Signed:
    """What ``Signer.sign`` computes for a batch of documents."""

    sigs: np.ndarray  # (n, num_perm) uint32
    exact: np.ndarray  # (n, 2) uint64: xxh3-128 of the collapsed normalised text


class Signer:
    """Computes MinHash signatures and exact-text hashes for batches of documents."""

    def __init__(self, num_perm: int = 128, seed: int = 1, ngram: int = 5):
        self.num_perm, self.seed, self.ngram = num_perm, seed, ngram
        self.a, self.b = permutations(num_perm, seed)

    def shingle_sets(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Sorted unique shingle hashes of each text, concatenated, and their offsets."""
        buf, offsets = _encode(texts)
        hashes, hoff = _shingle_hashes_batch(buf, offsets, self.ngram)
        # One vectorised sort of (document, hash) keys instead of a sort per document.
        doc = np.repeat(np.arange(len(texts), dtype=np.uint64), np.diff(hoff))
        keys = np.sort((doc << np.uint64(32)) | hashes.astype(np.uint64))
        keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys
        sets_off = np.searchsorted(keys >> np.uint64(32), np.arange(len(texts) + 1, dtype=np.uint64))
        return (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32), sets_off.astype(np.int64)

    def sign(self, texts: list[str]) -> Signed:
        """MinHash signatures and 128-bit exact-duplicate hashes of ``texts``."""
        buf, offsets = _encode(texts)
        n = len(texts)
        sigs = np.empty((n, self.num_perm), dtype=np.uint32)
        collapsed = np.empty(max(1, buf.shape[0]), dtype=np.uint8)
        coffsets = np.empty(n + 1, dtype=np.int64)
        _sign_batch(buf, offsets, self.ngram, self.a, self.b, sigs, collapsed, coffsets)
        cb = memoryview(collapsed)
        digest = xxhash.xxh3_128_digest
        exact = np.frombuffer(
            b"".join(digest(cb[coffsets[i] : coffsets[i + 1]]) for i in range(n)), dtype=np.uint64
        ).reshape(-1, 2)
        return Signed(sigs, exact.copy())
