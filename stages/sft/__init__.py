"""SFT stage: ChatML rendering, assistant-only loss, packing, shared trainer (config registered)."""

from pipeline.stage import InputSlot, register
from stages.sft.config import SFTConfig, check

# model: the pretrain instance's model (or the instance named by `init_from`; a directory there instead);
# tokenizer: the tokenize instance's, used when the model directory has none. adapter: with `lora:`, the
# trained adapters in PEFT's format (model/ holds them merged). instruction_val: the held-out examples,
# tokenized with their answer masks (evaluate scores every model's answer loss on them).
register(name="sft", config=SFTConfig, version="1", run="stages.sft.run:run",
         inputs={"model": InputSlot("model", required=False, prefer=("pretrain",), config_key="init_from"),
                 "tokenizer": InputSlot("tokenizer", required=False, prefer=("tokenize",))},
         outputs={"model": "model", "adapter": "adapter", "metrics": "metrics.jsonl",
                  "instruction_val": "data/val.arrow"},
         check=check, verdict="stages.lm.verdict:sft")

__all__ = ["SFTConfig"]
