"""Dedupe stage: exact and MinHash-LSH near-duplicate removal on Ray (config registered here)."""

from pipeline.stage import register
from stages.dedupe.config import DedupeConfig

# documents: the kept documents as Parquet parts (id, text, source), the format every data stage reads.
register(name="dedupe", config=DedupeConfig, version="1", run="stages.dedupe.run:run",
         report="stages.dedupe.report_section:section", verdict="stages.dedupe.verdict:verdict",
         outputs={"documents": "data"})

__all__ = ["DedupeConfig"]
