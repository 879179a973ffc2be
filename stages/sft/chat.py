"""Chat records -> ChatML text -> token ids with an assistant-only loss mask.

Records come in the formats TRL and OpenRLHF accept:

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
- ``{"prompt": str, "completion": str}`` (rendered as one user turn and one assistant turn);
- ``{"prompt": [messages], "completion": [assistant messages]}`` (conversational prompt/completion).

Rendering is ChatML, exactly what ``CHAT_TEMPLATE`` (the template the tokenize stage writes and the sft
stage exports with its model) renders::

    <|im_start|>{role}\\n{content}<|im_end|>\\n   (for every message)

The whole rendered text is tokenized at once, as ``transformers``' ``apply_chat_template`` does, so the
training ids are exactly the ids a user gets from the exported tokenizer. The loss mask is derived
from character spans: a token is trained on iff it starts inside an assistant message's content or is
the ``<|im_end|>`` closing that message. Everything else (system and user turns, ``<|im_start|>``, role
names, the newlines of the template) is not. Tokenizing pieces separately and concatenating would not be
exact: BPE may merge across the boundary between the template and the content.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from stages.tokenize.config import EOT, IM_END, IM_START, PAD
from stages.tokenize.tokenizer import CHAT_TEMPLATE

__all__ = ["CHAT_TEMPLATE", "BadRecord", "ChatEncoder", "render", "to_messages"]

ROLES = ("system", "user", "assistant")
CONTROL_TOKENS = (IM_START, IM_END, EOT, PAD)
Message = dict[str, str]


class BadRecord(ValueError):
    """A record that cannot be turned into a training conversation (the message is the reason)."""


def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _check_messages(msgs: Any, where: str) -> list[Message]:
    if not isinstance(msgs, list) or not msgs:
        raise BadRecord(f"{where} must be a non-empty list of messages, got {_type(msgs)}"
                        + (" (empty)" if isinstance(msgs, list) else ""))
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRecord(f"{where}[{i}] is {_type(m)}, not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRecord(f"{where}[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadRecord(f"{where}[{i}].content is {_type(content)}, not a string")
        for tok in CONTROL_TOKENS:
            if tok in content:
                raise BadRecord(f"{where}[{i}].content contains the control token {tok} "
                                "(it would break the chat structure)")
        out.append({"role": role, "content": content})
    return out


def to_messages(obj: dict[str, Any]) -> list[Message]:
    """The conversation of a record (see the module docstring); raises ``BadRecord`` with the reason."""
    has_msgs, has_pc = "messages" in obj, "prompt" in obj or "completion" in obj
    if has_msgs and has_pc:
        raise BadRecord("record has both 'messages' and 'prompt'/'completion'; use one form")
    if has_msgs:
        msgs = _check_messages(obj["messages"], "messages")
    elif has_pc:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if prompt is None or completion is None:
            raise BadRecord(f"record needs both 'prompt' and 'completion' (missing "
                            f"{'prompt' if prompt is None else 'completion'})")
        if isinstance(prompt, str) and isinstance(completion, str):
            if not prompt.strip() or not completion.strip():
                raise BadRecord(f"empty {'prompt' if not prompt.strip() else 'completion'}")
            msgs = _check_messages([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": completion}], "prompt/completion")
        elif isinstance(prompt, list) and isinstance(completion, list):
            head, tail = _check_messages(prompt, "prompt"), _check_messages(completion, "completion")
            if any(m["role"] != "assistant" for m in tail):
                raise BadRecord("completion messages must all have role 'assistant'")
            msgs = head + tail
        else:
            raise BadRecord(f"prompt and completion must both be strings or both be message lists "
                            f"(got {_type(prompt)} and {_type(completion)})")
    else:
        raise BadRecord("record has neither 'messages' nor 'prompt'/'completion'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadRecord("conversation has no assistant message (nothing to train on)")
    return msgs


def render(messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """ChatML text of a conversation and the character spans trained on: each assistant content plus
    its closing ``<|im_end|>``."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for m in messages:
        head = f"{IM_START}{m['role']}\n"
        parts += [head, m["content"], IM_END + "\n"]
        start = pos + len(head)
        end = start + len(m["content"])
        if m["role"] == "assistant":
            spans.append((start, end + len(IM_END)))
        pos = end + len(IM_END) + 1
    return "".join(parts), spans


def _mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    starts = np.fromiter((s for s, _ in offsets), np.int64, len(offsets))
    keep = np.zeros(len(offsets), bool)
    for a, b in spans:
        keep |= (starts >= a) & (starts < b)
    return keep


class ChatEncoder:
    """Token ids and loss masks of conversations with a HF fast tokenizer (``tokenizer.json``)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        missing = [t for t in (IM_START, IM_END) if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"the tokenizer lacks the ChatML token(s) {', '.join(missing)}")

    @classmethod
    def from_str(cls, tokenizer_json: str) -> ChatEncoder:
        return cls(Tokenizer.from_str(tokenizer_json))

    def encode(self, messages: Sequence[Message]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32, trained bool) of one conversation."""
        return self.encode_batch([messages])[0]

    def encode_batch(self, conversations: Sequence[Sequence[Message]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Like ``encode`` for many conversations (the tokenizer encodes them in parallel)."""
        rendered = [render(c) for c in conversations]
        encs = self.tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
        return [(np.asarray(e.ids, np.int32), _mask(e.offsets, spans))
                for e, (_, spans) in zip(encs, rendered, strict=True)]
