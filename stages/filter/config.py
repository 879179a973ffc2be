"""Configuration of the filter stage: rule sets, language id, PII masking, decontamination.

Every threshold is a field; ``null`` turns that rule off. A rule set is on when its key is present
(``gopher_quality: {}`` applies it with the published defaults) and can be limited to documents whose
``source_field`` value is in its ``sources``.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from pipeline.errors import ConfigError
from pipeline.preflight import FILE, GLOBS
from pipeline.stage import StrictModel, volatile

GOPHER_STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]


class RuleSet(StrictModel):
    """Fields shared by every rule set."""

    sources: list[str] | None = Field(
        None, description="apply only to documents whose source field is one of these (default: all)")


class GopherQuality(RuleSet):
    """Gopher quality rules (Rae et al. 2021, appendix A1), thresholds as published."""

    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_hash_word_ratio: float | None = Field(0.1, description="'#' per word")
    max_ellipsis_word_ratio: float | None = Field(0.1, description="'...' and '…' per word")
    max_bullet_lines_ratio: float | None = Field(0.9, description="lines starting with '•' or '-'")
    max_ellipsis_lines_ratio: float | None = Field(0.3, description="lines ending with an ellipsis")
    min_alpha_words_ratio: float | None = Field(0.8, description="words with an alphabetic character")
    min_stop_words: int | None = Field(2, description="distinct stop words present")
    stop_words: list[str] = Field(default_factory=lambda: list(GOPHER_STOP_WORDS))


class GopherRepetition(RuleSet):
    """Gopher repetition rules (Rae et al. 2021, table A1): duplicated lines, paragraphs and n-grams."""

    dup_para_frac: float | None = 0.3
    dup_para_char_frac: float | None = 0.2
    dup_line_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    top_ngram_char_frac: dict[int, float | None] = Field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16},
        description="n -> largest share of characters in the most frequent n-gram")
    dup_ngram_char_frac: dict[int, float | None] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> largest share of characters in duplicated n-grams")

    @model_validator(mode="after")
    def _check(self) -> GopherRepetition:
        for name in ("top_ngram_char_frac", "dup_ngram_char_frac"):
            if any(n < 1 or n > 64 for n in getattr(self, name)):
                raise ValueError(f"{name}: n-gram sizes must be between 1 and 64")
        return self


class C4(RuleSet):
    """C4 rules (Raffel et al. 2020, section 2.2). Lines failing a line rule are dropped from the text."""

    terminal_punctuation: bool = Field(True, description="keep only lines ending in . ? ! \" '")
    min_words_per_line: int | None = 3
    max_word_length: int | None = Field(1000, description="drop lines holding a longer word")
    remove_citations: bool = Field(True, description="remove [1], [edit], [citation needed]")
    javascript: bool = Field(True, description="drop lines mentioning javascript")
    policy: bool = Field(True, description="drop lines about cookies and terms of use")
    lorem_ipsum: bool = Field(True, description="remove documents containing 'lorem ipsum'")
    curly_bracket: bool = Field(True, description="remove documents with a '{' in a kept line")
    min_sentences: int | None = Field(5, description="sentences in the kept lines")
    bad_words: list[str] | None = Field(
        None, description="remove documents containing one of these words (off by default; C4 used the "
                          "LDNOOBW list, which is not shipped)")
    bad_words_file: str | None = Field(None, description="file with one bad word per line",
                                       json_schema_extra=FILE)


class FineWeb(RuleSet):
    """FineWeb rules (Penedo et al. 2024)."""

    min_line_punct_ratio: float | None = Field(0.12, description="lines ending in terminal punctuation")
    line_punct_exclude_zero: bool = Field(False, description="keep documents with no such line at all")
    max_short_line_ratio: float | None = Field(0.67, description="lines of at most short_line_length chars")
    short_line_length: int = 30
    max_char_dup_ratio: float | None = Field(0.01, description="characters in duplicated lines")
    max_newline_word_ratio: float | None = Field(0.3, description="newlines per word (lists)")


class Language(StrictModel):
    """Language id with fastText's lid.176 model (shipped in a package; nothing downloaded)."""

    languages: list[str] | None = Field(
        ["en"], description="ISO 639-1 codes to keep; null keeps all (only annotates)")
    min_score: float = Field(0.65, ge=0.0, le=1.0, description="documents scoring less are removed")


class Pii(StrictModel):
    """Mask e-mail and IP addresses in kept documents."""

    email: bool = True
    ip: bool = True
    email_replacement: str = "email@example.com"
    ip_replacement: str = "0.0.0.0"


class Decontaminate(StrictModel):
    """Remove documents sharing a word n-gram with an evaluation item (GPT-3 used 13-grams)."""

    eval_files: list[str] | None = Field(
        None, description="globs of JSONL: {context, choices}, {prompt}, {messages}, {prompt, chosen, "
                          "rejected}; default: the pipeline's own evaluation data (evaluate's tasks and "
                          "prompts, sft's and dpo's val), each field one evaluation set",
        json_schema_extra=GLOBS)
    ngram: int = Field(13, ge=3, le=64)
    min_words: int = Field(
        8, ge=1, description="an item text shorter than ngram but at least this long is matched whole")

    @model_validator(mode="after")
    def _check(self) -> Decontaminate:
        if self.eval_files is not None and not self.eval_files:
            raise ValueError("eval_files must name at least one glob (or be omitted: the pipeline's own "
                             "evaluation data)")
        if self.min_words > self.ngram:
            raise ValueError("min_words must not exceed ngram")
        return self


class FilterConfig(StrictModel):
    """Language, quality and contamination filters; documents in, documents out (dedupe's layout).

    Reads the dedupe stage's ``data/`` when the pipeline has dedupe, else its own ``input`` glob(s).
    Applies, in this order: language, gopher_repetition, gopher_quality, c4, fineweb, decontaminate;
    the first rule a document fails removes it. PII masking comes last, on kept documents.
    """

    input: str | list[str] | None = Field(
        None, description="glob(s) of JSONL, JSONL.gz, JSONL.zst or Parquet files; only without dedupe",
        json_schema_extra=GLOBS)
    text_field: str = "text"
    id_field: str | None = Field(None, description="input field holding document ids; else file:line")
    source_field: str = Field("source", description="field naming a document's source (rule set `sources`)")
    language: Language | None = None
    gopher_repetition: GopherRepetition | None = None
    gopher_quality: GopherQuality | None = None
    c4: C4 | None = None
    fineweb: FineWeb | None = None
    decontaminate: Decontaminate | None = None
    pii: Pii | None = None
    row_group_rows: int = Field(8192, ge=1, description="rows per Parquet row group in outputs")
    sample_per_rule: int = volatile(20, ge=0, description="removed documents per rule shown in MLflow")
    num_workers: int | None = volatile(None, ge=1, description="concurrent Ray tasks (default: cluster CPUs)")

    def uses_pipeline_eval_data(self) -> bool:
        """Decontaminating against the pipeline's own evaluation data: the core then counts those files
        as inputs of this stage (in its fingerprint)."""
        return self.decontaminate is not None and not self.decontaminate.eval_files

    @model_validator(mode="after")
    def _check(self) -> FilterConfig:
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input must name at least one glob")
        return self


def check(config: BaseModel, bound: dict[str, list[str]]) -> None:
    """Cross-stage rule: filter reads an upstream stage's documents when one is bound, else its own
    ``input``."""
    if bound.get("documents") and getattr(config, "input", None):
        raise ConfigError("stages.filter.input",
                          f"filter reads the documents of stage {bound['documents'][0]}; remove "
                          "stages.filter.input (or that stage)")
    if not bound.get("documents") and not getattr(config, "input", None):
        raise ConfigError("stages.filter.input",
                          "required when the pipeline has no dedupe stage: a glob of JSONL, JSONL.gz, "
                          "JSONL.zst or Parquet files")
