"""The sft stage's tokenizer directory: the source tokenizer with the ChatML chat template it trains with.

``<out>/tokenizer/`` is what the exported ``model/`` carries, so ``apply_chat_template`` on the exported
model renders conversations exactly as training did. It is the source tokenizer (the tokenize stage's,
or the model directory's) with, in ``tokenizer_config.json``:

- ``chat_template``: ``CHAT_TEMPLATE`` (a different template in the source is replaced, and said so);
- ``eos_token``: ``<|im_end|>``, the end of an assistant turn, so that generation with the fine-tuned
  model (``generation_config.json`` takes its eos from here) stops at the end of the answer, as
  chat models' tokenizers do.

A ``chat_template.jinja`` file of the source is not copied (transformers would prefer it to the config).
"""

from __future__ import annotations

import json
import logging

from tokenizers import Tokenizer

from pipeline import storage
from pipeline.errors import ConfigError
from stages.sft.chat import CHAT_TEMPLATE
from stages.tokenize.config import IM_END, IM_START

COPIED = ("tokenizer.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
          "added_tokens.json")


def prepare_tokenizer(src_dir: str, out_dir: str, logger: logging.Logger) -> str:
    """Write ``out_dir`` from ``src_dir`` (see the module docstring); returns ``tokenizer.json``'s text."""
    try:
        tok_json = storage.read_text(storage.join(src_dir, "tokenizer.json"))
    except FileNotFoundError:
        raise ConfigError("stages.sft", f"{src_dir} has no tokenizer.json (a Hugging Face fast tokenizer "
                                        "is needed)") from None
    tok = Tokenizer.from_str(tok_json)
    missing = [t for t in (IM_START, IM_END) if tok.token_to_id(t) is None]
    if missing:
        raise ConfigError("stages.sft", f"the tokenizer in {src_dir} lacks the ChatML token(s) "
                                        f"{', '.join(missing)} (the tokenize stage adds them)")
    cfg = storage.read_json_or(storage.join(src_dir, "tokenizer_config.json"), {})
    old = cfg.get("chat_template")
    if old is not None and old != CHAT_TEMPLATE:
        logger.warning("sft: replacing the chat template of %s with ChatML (the format sft trains with)",
                       src_dir)
    cfg |= {"chat_template": CHAT_TEMPLATE, "eos_token": IM_END}
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for name in COPIED:
        src = storage.join(src_dir, name)
        if storage.exists(src):
            data = storage.read_bytes(src)
            if name == "special_tokens_map.json":
                data = _with_eos(data)
            storage.write_bytes(storage.join(out_dir, name), data)
    storage.write_text(storage.join(out_dir, "tokenizer_config.json"),
                       json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return tok_json


def _with_eos(data: bytes) -> bytes:
    obj = json.loads(data)
    if "eos_token" in obj:
        obj["eos_token"] = IM_END
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
