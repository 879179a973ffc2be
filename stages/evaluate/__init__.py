"""Evaluate stage: perplexity, held-out answer loss, multiple choice, preference accuracy and generations
for every model the pipeline trains, the comparison table and charts, and the best model in the MLflow
registry.

Only the config model is imported here (torch-free); the work lives in ``stages.evaluate.run``.
"""

from pipeline.stage import InputSlot, register
from stages.evaluate.config import EvaluateConfig, check

# models: every instance that outputs a model unless `models:` names some; data/tokenizer: the tokenize
# instance's validation split and tokenizer; pairs: a dpo instance's held-out pairs (and its reference);
# answers: an sft instance's held-out examples (answer loss).
register(
    name="evaluate",
    config=EvaluateConfig,
    version="1",
    run="stages.evaluate.run:run",
    inputs={"data": InputSlot("shards", prefer=("tokenize",)),
            "tokenizer": InputSlot("tokenizer", prefer=("tokenize",)),
            "models": InputSlot("model", many=True, config_key="models"),
            "pairs": InputSlot("preference_pairs", required=False, prefer=("dpo",)),
            "reference": InputSlot("reference_logps", required=False, prefer=("dpo",)),
            "answers": InputSlot("instruction_val", required=False, prefer=("sft",))},
    outputs={"results": "results.json"},
    check=check,
    report="stages.evaluate.report_section:section",
    verdict="stages.evaluate.verdict:verdict",
)

__all__ = ["EvaluateConfig"]
