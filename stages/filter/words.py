"""Word and sentence splitting for the English quality rules.

The Gopher and FineWeb rules count words; their reference implementation splits English with spaCy's
rule-based English tokenizer (``spacy.blank("en")``: rules shipped in the package, no model download) and
counts C4 sentences with spaCy's rule-based sentencizer. Using the same splitter makes every word count,
and so every decision, the same.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _tokenizer():
    import spacy

    return spacy.blank("en").tokenizer


@functools.lru_cache(maxsize=1)
def _sentencizer():
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    return nlp


def split_words(text: str) -> list[str]:
    """Tokens of ``text``, stripped, whitespace tokens dropped."""
    words = []
    for tok in _tokenizer()(text):
        w = tok.text.strip()
        if w:
            words.append(w)
    return words


def count_sentences(line: str) -> int:
    """Sentences in one line (at least 1 for non-blank text)."""
    nlp = _sentencizer()
    nlp.max_length = max(nlp.max_length, len(line) + 10)
    return sum(1 for _ in nlp(line).sents) or 1
