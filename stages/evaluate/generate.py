"""Greedy generations for a list of prompts (``{"prompt": str}`` JSONL), saved for reading.

Instruction-tuned models (``chat_models``) get the prompt as a ChatML user turn followed by the assistant
header (``apply_chat_template(..., add_generation_prompt=True)``); the others get the raw prompt.
Generation stops at ``<|im_end|>`` or ``<|endoftext|>``; the stop token is not part of the text.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer

from stages.evaluate.records import read_jsonl
from stages.tokenize.config import EOT, IM_END, IM_START


def load_prompts(path: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(prompts, rejects with reasons)."""
    prompts, rejects = [], []
    for line_no, obj, err in read_jsonl(path):
        reason = err
        if reason is None:
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("prompt"), str)
                or not obj["prompt"].strip()
            ):
                reason = 'expected {"prompt": non-empty string}'
            elif any(t in obj["prompt"] for t in (IM_START, IM_END, EOT)):
                reason = "prompt contains a control token"
        if reason:
            rejects.append({"task": "prompts", "path": path, "line": line_no, "reason": reason})
        else:
            prompts.append(obj["prompt"])
    return prompts, rejects


def format_prompt(prompt: str, chat: bool) -> str:
    return f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n" if chat else prompt


def stop_ids(tok: Tokenizer) -> list[int]:
    return [i for i in (tok.token_to_id(IM_END), tok.token_to_id(EOT)) if i is not None]


@torch.no_grad()
def generate_all(
    model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, stops: list[int], batch_size: int
) -> list[list[int]]:
    """New tokens of each prompt (greedy), stop token removed. Prompts are cut from the left to leave
    room for ``max_new_tokens`` in the model's context."""
    keep = max(1, model.cfg.max_seq_len - max_new_tokens)
    out: list[list[int]] = []
    for b in range(0, len(prompts), batch_size):
        chunk = [p[-keep:] for p in prompts[b : b + batch_size]]
        for new in model.generate(chunk, max_new_tokens, temperature=0.0, stop_tokens=stops):
            out.append(new[:-1] if new and new[-1] in stops else new)
    return out
