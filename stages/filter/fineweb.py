"""FineWeb quality rules (Penedo et al. 2024): terminal punctuation, short lines, duplicated lines, lists."""

from __future__ import annotations

from stages.filter.config import FineWeb
from stages.filter.ngrams import duplicates
from stages.filter.punctuation import TERMINAL_PUNCTUATION


def fineweb(cfg: FineWeb, text: str, n_words: int) -> tuple[str, float] | None:
    """``None`` when the document passes, else ``(rule, value)`` of the first rule it fails."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return ("empty", 0.0)
    punct = sum(1 for line in lines if line.endswith(TERMINAL_PUNCTUATION)) / len(lines)
    if (cfg.min_line_punct_ratio is not None and punct < cfg.min_line_punct_ratio
            and not (punct == 0 and cfg.line_punct_exclude_zero)):
        return ("min_line_punct_ratio", punct)
    short = sum(1 for line in lines if len(line) <= cfg.short_line_length) / len(lines)
    if cfg.max_short_line_ratio is not None and short > cfg.max_short_line_ratio:
        return ("max_short_line_ratio", short)
    dup_chars = duplicates(lines)[1] / len(text.replace("\n", ""))
    if cfg.max_char_dup_ratio is not None and dup_chars > cfg.max_char_dup_ratio:
        return ("max_char_dup_ratio", dup_chars)
    if cfg.max_newline_word_ratio is not None:
        ratio = text.count("\n") / n_words if n_words else float("inf")
        if ratio > cfg.max_newline_word_ratio:
            return ("max_newline_word_ratio", ratio)
    return None
