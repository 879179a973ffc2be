"""Gopher quality and repetition rules (Rae et al. 2021, appendix A1).

Each function returns ``None`` when the document passes, else ``(rule, value)``: the first rule it fails,
named after its threshold field, and the measured value. The checks run in the published order, so the
reported rule is the one the reference implementation reports.
"""

from __future__ import annotations

import re

import numpy as np

from stages.filter.config import GopherQuality, GopherRepetition
from stages.filter.ngrams import WordGrams, duplicates
from stages.filter.punctuation import PUNCTUATION

Removal = tuple[str, float]
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


def _over(value: float, limit: float | None) -> bool:
    return limit is not None and value > limit


def _under(value: float, limit: float | None) -> bool:
    return limit is not None and value < limit


def gopher_quality(cfg: GopherQuality, text: str, words: list[str]) -> Removal | None:
    """Word count and length, symbol ratios, bullet and ellipsis lines, alphabetic words, stop words."""
    n_words = len(words)
    if n_words == 0:
        return ("min_doc_words", 0.0)
    content = [w for w in words if not PUNCTUATION.issuperset(w)]  # words that are not only symbols
    n = len(content)
    if _under(n, cfg.min_doc_words):
        return ("min_doc_words", n)
    if _over(n, cfg.max_doc_words):
        return ("max_doc_words", n)
    avg = float(np.mean([len(w) for w in content])) if content else float("nan")
    if _under(avg, cfg.min_avg_word_length):
        return ("min_avg_word_length", avg)
    if _over(avg, cfg.max_avg_word_length):
        return ("max_avg_word_length", avg)
    hashes = text.count("#") / n_words
    if _over(hashes, cfg.max_hash_word_ratio):
        return ("max_hash_word_ratio", hashes)
    ellipses = (text.count("...") + text.count("…")) / n_words
    if _over(ellipses, cfg.max_ellipsis_word_ratio):
        return ("max_ellipsis_word_ratio", ellipses)
    lines = text.splitlines()
    bullets = sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines)
    if _over(bullets, cfg.max_bullet_lines_ratio):
        return ("max_bullet_lines_ratio", bullets)
    ell_lines = sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines)
    if _over(ell_lines, cfg.max_ellipsis_lines_ratio):
        return ("max_ellipsis_lines_ratio", ell_lines)
    alpha = sum(any(c.isalpha() for c in w) for w in words) / n_words
    if _under(alpha, cfg.min_alpha_words_ratio):
        return ("min_alpha_words_ratio", alpha)
    stops = len(set(cfg.stop_words).intersection(words))
    if _under(stops, cfg.min_stop_words):
        return ("min_stop_words", stops)
    return None


def gopher_repetition(cfg: GopherRepetition, text: str, words: list[str]) -> Removal | None:
    """Duplicated paragraphs and lines (count and characters), top n-grams, duplicated n-grams."""
    if not text:
        return ("empty", 0.0)
    size = len(text)
    paragraphs = _PARAGRAPHS.split(text.strip())
    dups, chars = duplicates(paragraphs)
    if _over(dups / len(paragraphs), cfg.dup_para_frac):
        return ("dup_para_frac", dups / len(paragraphs))
    if _over(chars / size, cfg.dup_para_char_frac):
        return ("dup_para_char_frac", chars / size)
    lines = _LINES.split(text)
    dups, chars = duplicates(lines)
    if _over(dups / len(lines), cfg.dup_line_frac):
        return ("dup_line_frac", dups / len(lines))
    if _over(chars / size, cfg.dup_line_char_frac):
        return ("dup_line_char_frac", chars / size)
    grams = WordGrams(words)
    for n, frac in cfg.top_ngram_char_frac.items():
        if frac is None:
            continue
        top = grams.top_ngram_chars(n)
        if top is not None and top / size > frac:
            return (f"top_{n}_gram_char_frac", top / size)
    for n, frac in cfg.dup_ngram_char_frac.items():
        if frac is None:
            continue
        dup = grams.duplicate_ngram_chars(n)
        if dup / size > frac:
            return (f"dup_{n}_gram_char_frac", dup / size)
    return None
