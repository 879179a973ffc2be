"""Configuration of the dedupe stage."""

from __future__ import annotations

import functools
from typing import Literal

from pydantic import Field, model_validator

from pipeline.preflight import GLOBS
from pipeline.stage import StrictModel, volatile


class DedupeConfig(StrictModel):
    """Exact and MinHash-LSH near-duplicate removal.

    Results depend only on the non-volatile fields; parallelism and batch sizes never change output.
    """

    input: str | list[str] = Field(description="glob(s) of JSONL, JSONL.gz, JSONL.zst or Parquet files",
                                   json_schema_extra=GLOBS)
    text_field: str = "text"
    id_field: str | None = Field(None, description="input field holding document ids; else the records' own "
                                                   "`id` field where they have one, else file:line")
    exact: bool = Field(True, description="remove documents whose normalised text repeats an earlier one")
    near: bool = Field(True, description="remove near duplicates (MinHash LSH)")
    ngram: int = Field(5, ge=1, le=64, description="words per shingle")
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash permutations")
    seed: int = Field(1, ge=0, description="seed of the permutations (as datasketch's MinHash seed)")
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard similarity that makes a duplicate")
    bands: int | None = Field(None, ge=1, description="LSH bands; with rows, overrides the optimiser")
    rows: int | None = Field(None, ge=1, description="LSH rows per band")
    false_negative_weight: float = Field(
        0.95, gt=0.0, lt=1.0,
        description="weight of missed pairs in datasketch's band optimiser (candidates are verified, so "
                    "false positives only cost verification time)",
    )
    verify: Literal["estimate", "exact", "hybrid"] = Field(
        "hybrid",
        description="check candidate pairs by signature estimate, by exact shingle Jaccard, or by the "
                    "estimate unless it is within verify_margin of the threshold, then exactly",
    )
    verify_margin: float = Field(
        0.1, ge=0.0, le=1.0, description="hybrid: estimates this close to the threshold are checked exactly"
    )
    max_cluster_size: int = Field(
        1000, ge=2, description="larger clusters are re-verified member by member against the kept document"
    )
    row_group_rows: int = Field(8192, ge=1, description="rows per Parquet row group in outputs")
    batch_docs: int = volatile(1024, ge=1, description="documents signed per kernel call")
    num_partitions: int | None = volatile(None, ge=1, description="shuffle partitions (default: 4 per CPU)")
    components: Literal["auto", "ray", "local"] = volatile(
        "auto", description="connected components on Ray, in process, or in process when edges fit"
    )
    local_max_edges: int = volatile(20_000_000, ge=0, description="edges up to which 'auto' stays in process")
    shuffle: Literal["auto", "ray", "local"] = volatile(
        "auto", description="bucket shuffle on Ray Data, in process, or in process when its rows fit "
                            "local_shuffle_max_rows (same output either way)")
    local_shuffle_max_rows: int = volatile(
        30_000_000, ge=0, description="shuffle rows (documents x (bands + 1), 26 bytes each) up to which "
                                      "'auto' shuffles in process")

    @model_validator(mode="after")
    def _check(self) -> DedupeConfig:
        if not (self.exact or self.near):
            raise ValueError("at least one of exact and near must be true")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands*rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input must name at least one glob")
        return self

    def shuffle_in_process(self, rows: int) -> bool:
        """Whether a bucket shuffle of ``rows`` rows runs in process (``shuffle``)."""
        return self.shuffle == "local" or (self.shuffle == "auto" and rows <= self.local_shuffle_max_rows)

    def verifier_args(self) -> dict:
        """Keyword arguments of ``sigstore.Verifier`` (besides the stage directory)."""
        return {"num_perm": self.num_perm, "seed": self.seed, "ngram": self.ngram,
                "threshold": self.threshold, "mode": self.verify, "margin": self.verify_margin}

    def lsh_params(self) -> tuple[int, int]:
        """(bands, rows): as set, or datasketch's optimiser with false negatives weighted up."""
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        return _optimal_bands(self.threshold, self.num_perm, self.false_negative_weight)


@functools.lru_cache(maxsize=64)
def _optimal_bands(threshold: float, num_perm: int, fn_weight: float) -> tuple[int, int]:
    from datasketch.lsh import _optimal_param  # numerical integration: ~30 ms, hence the cache

    return _optimal_param(threshold, num_perm, 1.0 - fn_weight, fn_weight)
