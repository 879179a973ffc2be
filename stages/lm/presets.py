"""Named model shapes, overridable field by field from a pipeline config (torch-free).

A stage config names a preset and optional overrides (``ModelSpec``); the trainer resolves it with the
vocabulary size and sequence length of the tokenized data::

    model: {preset: 125m, overrides: {n_layers: 10, rope_theta: 500000}}
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, model_validator

from pipeline.errors import ConfigError
from pipeline.stage import StrictModel
from stages.lm.model_config import ModelConfig

# vocab_size and max_seq_len are left out: they come from the tokenizer and the data.
PRESETS: dict[str, dict[str, Any]] = {
    # A demo model that trains in minutes on a laptop CPU.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, tie_embeddings=True),
    # GPT-3 "small"/"medium" widths in LLaMA form (SwiGLU at 8/3 * dim).
    "125m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, multiple_of=256),
    "350m": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, multiple_of=256),
    # TinyLlama-1.1B's shape.
    "1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632),
    # Llama-3-8B's shape (its tokenizer has 128256 tokens; here the vocabulary comes from the data).
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
                      multiple_of=1024, rope_theta=500000.0, norm_eps=1e-5),
}
DATA_FIELDS = ("vocab_size", "max_seq_len")
OVERRIDABLE = sorted(set(ModelConfig.model_fields) - set(DATA_FIELDS))


def resolve_model_config(preset: str, overrides: dict[str, Any], vocab_size: int, max_seq_len: int,
                         path: str = "model") -> ModelConfig:
    """The preset's shape with ``overrides`` applied and the data's vocabulary size / sequence length.

    ``overrides`` may raise ``vocab_size`` (padding, e.g. to a multiple of 64) or ``max_seq_len``
    (positions beyond the training length) but not lower them below what the data needs.
    """
    if preset not in PRESETS:
        raise ConfigError(f"{path}.preset", f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    for key in DATA_FIELDS:
        need = {"vocab_size": vocab_size, "max_seq_len": max_seq_len}[key]
        if key in overrides and overrides[key] < need:
            raise ConfigError(f"{path}.overrides.{key}", f"{overrides[key]} is below the data's {need}")
    fields = {**PRESETS[preset], "vocab_size": vocab_size, "max_seq_len": max_seq_len, **overrides}
    try:
        return ModelConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path}.overrides{'.' + loc if loc else ''}",
                          f"{err['msg']} (preset {preset!r}, fields {fields})") from e


class ModelSpec(StrictModel):
    """The model part of a stage config: a preset name plus per-field overrides."""

    preset: str = "tiny"
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        unknown = sorted(set(self.overrides) - set(ModelConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown model fields {unknown}; overridable: {', '.join(OVERRIDABLE)}")
        return self

    def resolve(self, vocab_size: int, max_seq_len: int, path: str = "model") -> ModelConfig:
        """The concrete ``ModelConfig`` for data with this vocabulary size and sequence length."""
        return resolve_model_config(self.preset, self.overrides, vocab_size, max_seq_len, path)
