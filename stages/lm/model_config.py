"""The model's shape as a config: torch-free so stage configs can embed it without importing torch."""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from pipeline.stage import StrictModel


class ModelConfig(StrictModel):
    """Shape of a LLaMA-style decoder. ``ffn_dim`` is explicit, or derived as LLaMA does from
    ``ffn_dim_multiplier`` and ``multiple_of`` (8/3 * dim, scaled, rounded up)."""

    vocab_size: int = Field(gt=0)
    dim: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int | None = Field(default=None, gt=0, description="None = n_heads (multi-head); 1 = MQA")
    ffn_dim: int | None = Field(default=None, gt=0)
    ffn_dim_multiplier: float | None = Field(default=None, gt=0)
    multiple_of: int = Field(default=256, gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)
    max_seq_len: int = Field(default=2048, gt=0)
    tie_embeddings: bool = False
    init_std: float = Field(default=0.02, gt=0)

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim ({self.dim // self.n_heads}) must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        return self

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (n_kv_heads, or n_heads when unset)."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Width of the SwiGLU feed-forward layer."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)
