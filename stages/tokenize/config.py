"""Configuration of the tokenize stage."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from pipeline.errors import ConfigError
from pipeline.preflight import GLOBS, TOKENIZER
from pipeline.stage import StrictModel, volatile

# The special tokens every Seedline tokenizer has (added to a loaded tokenizer that lacks them).
EOT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = {"eot": EOT, "pad": PAD, "im_start": IM_START, "im_end": IM_END}


class TrainTokenizer(StrictModel):
    """Train a byte-level BPE on a deterministic sample of the input."""

    vocab_size: int = Field(32000, ge=260, le=1 << 31, description="final vocabulary, special tokens too")
    sample_docs: int = Field(20000, ge=1, description="documents sampled (by a seeded hash of their id)")
    min_frequency: int = Field(2, ge=1, description="pairs seen fewer times are never merged")


class TokenizerSource(StrictModel):
    """Exactly one of ``path`` (a ``tokenizer.json`` or a directory holding one) or ``train``."""

    merge_defaults = False  # alternatives: a given block replaces the default whole

    path: str | None = Field(None, description="tokenizer.json or a HF tokenizer directory",
                             json_schema_extra=TOKENIZER)
    train: TrainTokenizer | None = None

    @model_validator(mode="after")
    def _one(self) -> TokenizerSource:
        if (self.path is None) == (self.train is None):
            raise ValueError("set exactly one of tokenizer.path and tokenizer.train")
        return self


class TokenizeConfig(StrictModel):
    """Tokenize documents, pack them into rows of ``seq_len + 1`` tokens, write Arrow shards.

    Reads the dedupe stage's ``data/`` when the pipeline has dedupe, else its own ``input`` glob(s).
    Results depend only on the non-volatile fields.
    """

    input: str | list[str] | None = Field(
        None, description="glob(s) of JSONL, JSONL.gz, JSONL.zst or Parquet files; only without dedupe",
        json_schema_extra=GLOBS)
    text_field: str = Field("text", description="text field of `input` records (dedupe output: 'text')")
    id_field: str | None = Field(
        None, description="id field of `input` records; else their own `id` field where present, "
                          "else file:line")
    tokenizer: TokenizerSource = TokenizerSource(train=TrainTokenizer())
    seq_len: int = Field(2048, gt=0, le=1 << 24, description="model context; rows hold seq_len + 1 tokens")
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0, description="share of documents (by id hash) in val")
    seed: int = Field(0, ge=0, description="seed of the train/val split hash and the tokenizer sample")
    rows_per_shard: int = Field(4096, ge=1, description="rows per output shard (the last may hold fewer)")
    max_chunk_chars: int = Field(
        100_000, ge=1000,
        description="longer documents are cut at whitespace into pieces of at most this many characters "
                    "before encoding (keeps encoding linear in document length)")
    num_workers: int | None = volatile(None, ge=1, description="concurrent Ray tasks (default: cluster CPUs)")
    batch_chars: int = volatile(1 << 20, ge=1, description="characters per encode_batch call")
    encoder: Literal["auto", "tokenizers"] = volatile(
        "auto", description="auto: tiktoken with the tokenizer's ranks when that gives identical ids "
                            "(checked), else HF tokenizers; tokenizers: always HF tokenizers")

    @model_validator(mode="after")
    def _check(self) -> TokenizeConfig:
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input must name at least one glob")
        return self


def check(config: BaseModel, bound: dict[str, list[str]]) -> None:
    """Cross-stage rule: tokenize reads an upstream stage's documents when one is bound, else its own
    ``input``."""
    if bound.get("documents") and getattr(config, "input", None):
        raise ConfigError("stages.tokenize.input",
                          f"tokenize reads the documents of stage {bound['documents'][0]}; remove "
                          "stages.tokenize.input (or that stage)")
    if bound.get("tokenizer") and (config.tokenizer.path is not None
                                   or config.tokenizer.train != TrainTokenizer()):
        raise ConfigError("stages.tokenize.tokenizer",
                          f"the tokenizer comes from stage {bound['tokenizer'][0]} (inputs); remove "
                          "stages.tokenize.tokenizer")
    if not bound.get("documents") and not getattr(config, "input", None):
        raise ConfigError("stages.tokenize.input",
                          "required when the pipeline has no dedupe stage: a glob of JSONL, JSONL.gz, "
                          "JSONL.zst or Parquet files")
