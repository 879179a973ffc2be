"""Signatures from the compiled batch kernel equal datasketch's MinHash on the same shingles."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import MinHash

from stages.dedupe.buckets import band_keys
from stages.dedupe.minhash import Signer, jaccard_pairs, normalize, shingle_hash, shingles


def _texts() -> list[str]:
    rng = random.Random(3)
    vocab = ["alpha", "Beta", "GAMMA", "délta", "ǅemal", "straße", "ﬁne", "日本語", "x", "q1"]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 60))) for _ in range(40)]
    texts += [
        "one", "two words", "Tabs\tand\nnew\r\nlines  and\u00a0nbsp\u2028line\u2029para\x85nel\u3000end",
        "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ and ﬀ ligatures", "   leading and trailing   ", "\x1cseparators\x1fhere",
    ]
    return texts


@pytest.mark.parametrize("num_perm,seed,ngram", [(128, 1, 5), (64, 7, 3), (256, 0, 1)])
def test_signatures_equal_datasketch_with_the_shingle_hash(num_perm, seed, ngram):
    texts = _texts()
    signer = Signer(num_perm, seed, ngram)
    signed = signer.sign(texts)
    sets, offsets = signer.shingle_sets(texts)
    for i, text in enumerate(texts):
        ref = MinHash(num_perm=num_perm, seed=seed, hashfunc=shingle_hash)
        ref.update_batch(shingles(text, ngram))
        assert np.array_equal(signed.sigs[i], ref.hashvalues), text
        expected = np.unique(np.array([shingle_hash(s) for s in shingles(text, ngram)], dtype=np.uint32))
        assert np.array_equal(sets[offsets[i] : offsets[i + 1]], expected)


def test_kernel_splits_words_exactly_like_python():
    for text in _texts():
        assert shingles(text, 100) == [" ".join(normalize(text).split()).encode()]
    # Every Unicode whitespace character separates words once normalised.
    spaces = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
    assert normalize(f"a{spaces}b").split() == ["a", "b"]
    signer = Signer(16, 1, 2)
    assert signer.sign([f"a{spaces}b"]).sigs.tolist() == signer.sign(["a b"]).sigs.tolist()


def test_exact_hash_ignores_case_width_and_spacing_only():
    s = Signer(16, 1, 5)
    a, b, c = s.sign(["Hello   World\n", "hello world", "Hello Worlds"]).exact
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_exact_jaccard_kernel_matches_python_sets():
    texts = _texts()[:20]
    signer = Signer(32, 1, 2)
    sets, offsets = signer.shingle_sets(texts)
    ia, ib = np.repeat(np.arange(20), 20), np.tile(np.arange(20), 20)
    got = jaccard_pairs(sets, offsets, ia, ib)
    for k, (i, j) in enumerate(zip(ia, ib, strict=True)):
        a, b = set(shingles(texts[i], 2)), set(shingles(texts[j], 2))
        assert got[k] == pytest.approx(len(a & b) / len(a | b))


def test_band_keys_differ_only_where_band_values_differ():
    sigs = np.tile(np.arange(16, dtype=np.uint32), (2, 1))
    sigs[1, 4:] += 1000
    keys = band_keys(sigs, 4, 4)
    assert keys[0, 0] == keys[1, 0] and (keys[0, 1:] != keys[1, 1:]).all()
