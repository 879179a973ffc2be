"""DPO stage: preference pairs, a frozen reference, TRL's losses and metrics on the shared trainer
(config registered; torch-free)."""

from pipeline.stage import InputSlot, register
from stages.dpo.config import DPOConfig, check

# model: the sft instance's model (or the instance named by `init_from`; a directory there instead);
# tokenizer: the tokenize instance's, used when the model directory has none. adapter: with `lora:`, the
# trained adapters in PEFT's format (model/ holds them merged).
register(name="dpo", config=DPOConfig, version="1", run="stages.dpo.run:run",
         inputs={"model": InputSlot("model", required=False, prefer=("sft",), config_key="init_from"),
                 "tokenizer": InputSlot("tokenizer", required=False, prefer=("tokenize",))},
         outputs={"model": "model", "adapter": "adapter", "metrics": "metrics.jsonl",
                  "preference_pairs": "pairs/val.arrow",
                  "reference_logps": "reference/val"},
         check=check, verdict="stages.lm.verdict:dpo")

__all__ = ["DPOConfig"]
