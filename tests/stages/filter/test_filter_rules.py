"""Each quality rule decides as datatrove's implementation does, on real documents of this machine;
language id, PII masking and the decontamination index on their own."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from bench.real_text import real_documents
from stages.filter.c4 import bad_words, c4
from stages.filter.config import C4, Decontaminate, FineWeb, GopherQuality, GopherRepetition, Pii
from stages.filter.fineweb import fineweb
from stages.filter.gopher import gopher_quality, gopher_repetition
from stages.filter.words import split_words

# datatrove's reason names -> this stage's rule names (the threshold fields).
REASONS = {
    "gopher_short_doc": "min_doc_words", "gopher_long_doc": "max_doc_words",
    "gopher_below_avg_threshold": "min_avg_word_length", "gopher_above_avg_threshold": "max_avg_word_length",
    "gopher_too_many_hashes": "max_hash_word_ratio", "gopher_too_many_ellipsis": "max_ellipsis_word_ratio",
    "gopher_too_many_bullets": "max_bullet_lines_ratio",
    "gopher_too_many_end_ellipsis": "max_ellipsis_lines_ratio",
    "gopher_below_alpha_threshold": "min_alpha_words_ratio", "gopher_enough_stop_words": "min_stop_words",
    "too_few_sentences": "min_sentences", "line_punct_ratio": "min_line_punct_ratio",
    "short_line_ratio": "max_short_line_ratio", "char_dup_ratio": "max_char_dup_ratio",
    "list_ratio": "max_newline_word_ratio", "document_removed_with_badwords": "bad_words",
}


def _theirs(result) -> str | None:
    if result is True:
        return None
    reason = result[1]
    if m := re.fullmatch(r"top_(\d+)_gram", reason):
        return f"top_{m.group(1)}_gram_char_frac"
    if m := re.fullmatch(r"duplicated_(\d+)_n_grams", reason):
        return f"dup_{m.group(1)}_gram_char_frac"
    return REASONS.get(reason, reason)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """1200 real documents (every rule below still fires both ways), each cut to its first 8000
    characters (at a line end): the decisions are compared on whatever text both sides see, and
    datatrove's spaCy word splitting of the long tails (Python sources up to 20000 characters) took most
    of the time."""
    return [t if len(t) <= 8000 else t[: t.rfind("\n", 0, 8000) + 1] or t[:8000]
            for t in real_documents(1200)]


def _compare(docs, theirs_filter, mine) -> Counter:
    """Decisions of both on every document; returns the decision counts (asserting equality)."""
    from datatrove.data import Document

    counts: Counter = Counter()
    for i, text in enumerate(docs):
        doc = Document(text=text, id=str(i))
        want = _theirs(theirs_filter.filter(doc))
        got, new_text = mine(text)
        assert got == want, f"document {i}: seedline {got}, datatrove {want}\n{text[:500]}"
        if got is None and new_text is not None:
            assert new_text == doc.text, f"document {i}: kept text differs"
        counts[got] += 1
    return counts


def _rules_fired(counts: Counter, at_least: int) -> None:
    # The sample must exercise the rules both ways, or agreement would prove little.
    assert counts[None] >= 20 and sum(v for k, v in counts.items() if k) >= 20, counts
    assert len([k for k in counts if k]) >= at_least, counts


@pytest.mark.slow
def test_gopher_quality_matches_datatrove(docs):
    from datatrove.pipeline.filters import GopherQualityFilter

    cfg = GopherQuality()
    counts = _compare(docs, GopherQualityFilter(),
                      lambda t: (_first(gopher_quality(cfg, t, split_words(t))), None))
    _rules_fired(counts, 4)


@pytest.mark.slow
def test_gopher_repetition_matches_datatrove(docs):
    from datatrove.pipeline.filters import GopherRepetitionFilter

    cfg = GopherRepetition()
    counts = _compare(docs, GopherRepetitionFilter(),
                      lambda t: (_first(gopher_repetition(cfg, t, split_words(t))), None))
    _rules_fired(counts, 8)


@pytest.mark.slow
def test_c4_matches_datatrove_decision_and_kept_lines(docs):
    from datatrove.pipeline.filters import C4QualityFilter

    cfg = C4()

    def mine(t):
        r = c4(cfg, t)
        return _first(r.removal), r.text

    counts = _compare(docs, C4QualityFilter(), mine)
    _rules_fired(counts, 2)


@pytest.mark.slow
def test_fineweb_matches_datatrove(docs):
    from datatrove.pipeline.filters import FineWebQualityFilter

    cfg = FineWeb()
    counts = _compare(docs, FineWebQualityFilter(),
                      lambda t: (_first(fineweb(cfg, t, len(split_words(t)))), None))
    _rules_fired(counts, 3)


def test_c4_bad_words_match_datatrove(docs, tmp_path, monkeypatch):
    """The bad-words rule (off by default) with a word list given as a file, as datatrove reads one."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import c4_filters

    words = ["copyright", "warranty", "segfault"]
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(words) + "\n")
    monkeypatch.setattr(c4_filters, "cached_asset_path_or_download", lambda *a, **k: str(path))
    theirs = c4_filters.C4BadWordsFilter()
    cfg = C4(bad_words_file=str(path))
    listed = bad_words(cfg)
    removed = 0
    for i, text in enumerate(docs[:600]):
        r = c4(cfg.model_copy(update={"min_sentences": None, "terminal_punctuation": False,
                                      "curly_bracket": False, "lorem_ipsum": False}), text, listed)
        got = r.removal[0] if r.removal and r.removal[0] == "bad_words" else None
        assert got == _theirs(theirs.filter(Document(text=text, id=str(i)))), i
        removed += got is not None
    assert 20 <= removed <= 580


def test_thresholds_override_and_turn_off():
    text = "word " * 30  # 30 words: fails min_doc_words (50)
    words = split_words(text)
    assert gopher_quality(GopherQuality(), text, words)[0] == "min_doc_words"
    assert gopher_quality(GopherQuality(min_doc_words=10), text, words)[0] != "min_doc_words"
    assert gopher_quality(GopherQuality(min_doc_words=None), text, words)[0] != "min_doc_words"
    rep = GopherRepetition(top_ngram_char_frac={2: None, 3: None, 4: None}, dup_ngram_char_frac={})
    assert gopher_repetition(rep, text, words) is None


def _first(r):
    return None if r is None else r[0]


def test_language_id_on_translated_messages():
    """Real translations from the gettext catalogues installed here, several languages."""
    from bench.langid import samples
    from stages.filter.langid import identify

    docs, _ = samples(per_lang=20, doc_chars=300)
    by_lang: dict[str, list[bool]] = {}
    for lang, text in docs:
        by_lang.setdefault(lang, []).append(identify(text)[0] == lang)
    for lang in ("en", "de", "fr", "es", "ru", "ja", "zh"):
        assert lang in by_lang, sorted(by_lang)
        assert sum(by_lang[lang]) >= 0.9 * len(by_lang[lang]), (lang, by_lang[lang])
    lang, score = identify("Ceci est une phrase écrite en français, avec des mots très ordinaires.")
    assert lang == "fr" and 0.5 < score <= 1.0


def test_pii_masking_counts():
    from stages.filter.pii import mask

    text = ("Write to jane.doe@example.org or ops+alerts@mail.example.co.uk; servers 10.0.0.7 and "
            "2001:db8:85a3::8a2e:370:7334. Not addresses: version 1.2.3.4.5, time 12:30:45, a[1::2], x@y.")
    masked, emails, ips = mask(Pii(), text)
    assert (emails, ips) == (2, 2)
    assert "jane.doe" not in masked and "10.0.0.7" not in masked and "8a2e" not in masked
    assert "1.2.3.4.5" in masked and "12:30:45" in masked and "a[1::2]" in masked
    assert mask(Pii(ip=False), text)[2] == 0


def test_decontamination_index_formats(tmp_path):
    from stages.filter.decontam import build_index, eval_sets

    q = "Which standard library module provides tools for working with regular expression patterns in Python"
    (tmp_path / "mc.jsonl").write_text(json.dumps({"context": q, "choices": ["re", "os"]}) + "\n")
    chat = {"messages": [{"role": "system", "content": "You are a helpful assistant who answers every "
                                                       "question about the library carefully"},
                         {"role": "user", "content": "Explain what the pathlib module is used for, in "
                                                     "two short sentences please."}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    pref = {"prompt": "short", "chosen": "a b", "rejected": "c"}
    (tmp_path / "pref.jsonl").write_text(json.dumps(pref) + "\n")
    cfg = Decontaminate(eval_files=[str(tmp_path / "*.jsonl")])
    index, info = build_index(cfg, eval_sets(cfg, {"evaluate.prompts": ["ignored: eval_files is set"]}))
    assert info["mc.jsonl"]["items"] == 1 and info["mc.jsonl"]["ngrams"] == len(q.split()) - 13 + 1
    assert info["pref.jsonl"]["ngrams"] == 0  # every text shorter than min_words
    hit = index.match("Intro. " + q.upper() + "? The answer is re.")
    assert hit is not None and hit[1] == "mc.jsonl" and hit[2].startswith("which standard library")
    assert index.match("Explain what the pathlib module is used for in two short sentences please")[1] == \
        "chat.jsonl"  # a user message shorter than 13 words is matched whole
    assert index.match("You are a helpful assistant who answers every question about the library carefully") \
        is None  # system prompts are not evaluation items
    assert index.match("Nothing in common with any evaluation item, just ordinary training text.") is None


def test_eval_sets_from_the_pipeline_when_eval_files_omitted(tmp_path):
    from pipeline.config import validate_config
    from pipeline.errors import ConfigError
    from pipeline.preflight import eval_data
    from stages.filter.decontam import eval_sets

    for name in ("mc.jsonl", "prompts.jsonl", "val.jsonl"):
        (tmp_path / name).write_text(json.dumps({"prompt": "x"}) + "\n")
    cfg = validate_config({"name": "e", "workdir": str(tmp_path / "w"), "stages": {
        "dedupe": {"input": str(tmp_path / "*.jsonl")}, "tokenize": {},
        "pretrain": {}, "sft": {"data": str(tmp_path / "mc.jsonl"), "val": str(tmp_path / "val.jsonl")},
        "evaluate": {"tasks": [{"name": "mc", "path": str(tmp_path / "mc.jsonl")}],
                     "prompts": str(tmp_path / "prompts.jsonl")}}})
    found = eval_data(cfg.stage_configs())
    assert found == {"evaluate.tasks.0.path": [str(tmp_path / "mc.jsonl")],
                     "evaluate.prompts": [str(tmp_path / "prompts.jsonl")],
                     "sft.val": [str(tmp_path / "val.jsonl")]}
    sets = eval_sets(Decontaminate(), found)
    assert list(sets) == ["evaluate.prompts", "evaluate.tasks.0.path", "sft.val"]
    with pytest.raises(ConfigError, match="stages.filter.decontaminate.eval_files.*no evaluation data"):
        eval_sets(Decontaminate(), {})
