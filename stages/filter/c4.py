"""C4 rules (Raffel et al. 2020, section 2.2, and the TFDS ``c4_utils`` code).

Line rules drop lines (a too-long word, no terminal punctuation, too few words, javascript, cookie and
terms-of-use notices; citation marks are removed); document rules remove the document (lorem ipsum, a curly
bracket in a kept line, too few sentences in the kept lines, a bad word). A kept document's text becomes
its kept lines.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from stages.filter.config import C4
from stages.filter.words import count_sentences

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


@dataclass
class C4Result:
    removal: tuple[str, float] | None
    text: str
    lines_dropped: int
    detail: str = ""


@functools.lru_cache(maxsize=8)
def _bad_words_regex(words: tuple[str, ...]) -> re.Pattern:
    alternatives = "|".join(re.escape(w) for w in sorted(words))
    return re.compile(rf"(?:\W|^)({alternatives})(?:\W|$)")


def bad_words(cfg: C4) -> tuple[str, ...]:
    """The configured bad words (list and file), lower-cased, sorted."""
    words = set(cfg.bad_words or [])
    if cfg.bad_words_file:
        from pipeline import storage

        words.update(line.strip() for line in storage.read_text(cfg.bad_words_file).splitlines())
    return tuple(sorted(w.lower() for w in words if w.strip()))


def c4(cfg: C4, text: str, words: tuple[str, ...] = ()) -> C4Result:
    """Apply the C4 rules to ``text``; ``words`` are the bad words (see ``bad_words``)."""
    if words:
        m = _bad_words_regex(words).search(text.lower())
        if m is not None:
            return C4Result(("bad_words", 1.0), text, 0, m.group(1))
    sentences, kept, dropped = 0, [], 0
    for raw in text.splitlines():
        line = raw.strip()
        parts = line.split()
        if cfg.max_word_length is not None and any(len(p) > cfg.max_word_length for p in parts):
            dropped += 1
            continue
        if cfg.remove_citations:
            line = CITATION.sub("", line)
        if cfg.terminal_punctuation and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
            dropped += 1
            continue
        if cfg.min_words_per_line is not None and len(parts) < cfg.min_words_per_line:
            dropped += 1
            continue
        low = line.lower()
        if cfg.lorem_ipsum and "lorem ipsum" in low:
            return C4Result(("lorem_ipsum", 1.0), text, dropped)
        if cfg.javascript and "javascript" in low:
            dropped += 1
            continue
        if cfg.curly_bracket and "{" in line:
            return C4Result(("curly_bracket", 1.0), text, dropped)
        if cfg.policy and any(p in low for p in POLICY):
            dropped += 1
            continue
        # Sentences are counted only up to the threshold: the decision is the same, the time is not.
        if cfg.min_sentences is not None and sentences < cfg.min_sentences:
            sentences += count_sentences(line)
        kept.append(line)
    if cfg.min_sentences is not None and sentences < cfg.min_sentences:
        return C4Result(("min_sentences", float(sentences)), text, dropped)
    return C4Result(None, "\n".join(kept).strip(), dropped)
