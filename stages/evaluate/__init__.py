"""Evaluate stage: perplexity, multiple choice, preference accuracy and generations for every model the
pipeline trains, the comparison table and charts, and the best model in the MLflow registry.

Only the config model is imported here (torch-free); the work lives in ``stages.evaluate.run``.
"""

from pipeline.stage import register
from stages.evaluate.config import MODEL_STAGES, EvaluateConfig, check

register(
    name="evaluate",
    config=EvaluateConfig,
    version="1",
    run="stages.evaluate.run:run",
    consumes=("tokenize",),
    uses=MODEL_STAGES,
    check=check,
)

__all__ = ["EvaluateConfig"]
