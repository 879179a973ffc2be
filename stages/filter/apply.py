"""One document through the stage's rules, in order; the first rule it fails removes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stages.filter.c4 import bad_words, c4
from stages.filter.config import FilterConfig, RuleSet
from stages.filter.decontam import Index
from stages.filter.fineweb import fineweb
from stages.filter.gopher import gopher_quality, gopher_repetition
from stages.filter.pii import mask
from stages.filter.words import split_words


@dataclass
class Outcome:
    """What happened to one document: ``rule`` is None when kept (then ``text`` is its new text)."""

    text: str
    rule: str | None = None
    value: float = 0.0
    detail: str = ""
    columns: dict[str, Any] = field(default_factory=dict)
    c4_lines_dropped: int = 0
    emails: int = 0
    ips: int = 0


class Filter:
    """The configured rules, ready to apply (bad words read and the decontamination index loaded once)."""

    def __init__(self, cfg: FilterConfig, index: Index | None = None):
        self.cfg = cfg
        self.bad_words = bad_words(cfg.c4) if cfg.c4 is not None else ()
        self.index = index

    def _applies(self, rules: RuleSet | None, fields: dict[str, Any]) -> bool:
        if rules is None:
            return False
        return rules.sources is None or fields.get(self.cfg.source_field) in rules.sources

    def __call__(self, text: str, fields: dict[str, Any]) -> Outcome:
        cfg = self.cfg
        out = Outcome(text)
        if cfg.language is not None:
            from stages.filter.langid import identify

            lang, score = identify(text)
            out.columns = {"language": lang, "language_score": score}
            langs = cfg.language.languages
            if langs is not None and lang not in langs:
                return self._removed(out, "language.languages", score, lang)
            if score < cfg.language.min_score:
                return self._removed(out, "language.min_score", score, lang)
        words: list[str] | None = None
        if self._applies(cfg.gopher_repetition, fields):
            words = split_words(text)
            r = gopher_repetition(cfg.gopher_repetition, text, words)
            if r is not None:
                return self._removed(out, f"gopher_repetition.{r[0]}", r[1])
        if self._applies(cfg.gopher_quality, fields):
            words = split_words(text) if words is None else words
            r = gopher_quality(cfg.gopher_quality, text, words)
            if r is not None:
                return self._removed(out, f"gopher_quality.{r[0]}", r[1])
        if self._applies(cfg.c4, fields):
            res = c4(cfg.c4, text, self.bad_words)
            out.c4_lines_dropped = res.lines_dropped
            if res.removal is not None:
                return self._removed(out, f"c4.{res.removal[0]}", res.removal[1], res.detail)
            if res.text != text:
                text, words = res.text, None
        if self._applies(cfg.fineweb, fields):
            n_words = len(split_words(text) if words is None else words)
            r = fineweb(cfg.fineweb, text, n_words)
            if r is not None:
                return self._removed(out, f"fineweb.{r[0]}", r[1])
        if self.index is not None:
            hit = self.index.match(text)
            if hit is not None:
                return self._removed(out, "decontaminate", float(hit[0]), f"{hit[1]}: {hit[2]}")
        if cfg.pii is not None:
            text, out.emails, out.ips = mask(cfg.pii, text)
        out.text = text
        return out

    @staticmethod
    def _removed(out: Outcome, rule: str, value: float, detail: str = "") -> Outcome:
        out.rule, out.value, out.detail = rule, float(value), detail
        return out
