"""Dedupe stage: exact and MinHash-LSH near-duplicate removal on Ray (config registered here)."""

from pipeline.stage import register
from stages.dedupe.config import DedupeConfig

register(name="dedupe", config=DedupeConfig, version="1", run="stages.dedupe.run:run")

__all__ = ["DedupeConfig"]
