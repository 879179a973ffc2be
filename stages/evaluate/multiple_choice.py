"""Multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness scores them.

A record is ``{"context": str, "choices": [str, ...], "gold": int}``. Each choice is a continuation of the
context (choices carry their own leading space, e.g. ``" Returns the sum."``). With ``num_fewshot`` k,
k other records of the same file, drawn with ``random.Random(seed + index)``, are put before the context
as solved examples (``context + gold choice``), separated by blank lines (lm-eval's fewshot delimiter).

- ``acc``: the choice with the highest log-likelihood is the gold one;
- ``acc_norm``: the same with each log-likelihood divided by the choice's length in characters.

Tokenization follows lm-eval: the context's trailing whitespace moves to the continuation, the whole
string is encoded once and the continuation is what follows the context's own encoding.

Chat models (the evaluate stage's ``chat_models``) are asked the way they were trained, as lm-eval's
``--apply_chat_template`` does: the (few-shot) context becomes one ChatML user turn followed by the
assistant header, and each choice, without its leading space, is the assistant's answer. ``acc_norm``
divides by the choice's length as written in the task either way.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from pipeline import storage
from stages.evaluate.config import TaskConfig
from stages.evaluate.records import read_jsonl

FEWSHOT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    gold: int


def parse_example(obj: Any) -> Example:
    """A valid record, or ``ValueError`` naming what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"record is {type(obj).__name__}, not an object")
    missing = [k for k in ("context", "choices", "gold") if k not in obj]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    ctx, choices, gold = obj["context"], obj["choices"], obj["gold"]
    if not isinstance(ctx, str) or not ctx.strip():
        raise ValueError("context must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2:
        raise ValueError("choices must be a list of at least two strings")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError("every choice must be a non-empty string")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"gold must be an index into choices (0..{len(choices) - 1}), got {gold!r}")
    return Example(ctx, tuple(choices), gold)


def load_task(task: TaskConfig) -> tuple[list[Example], list[dict[str, Any]]]:
    """(valid examples, rejects with reasons) of a task file; ``limit`` applies to the valid ones."""
    if not storage.exists(task.path):
        raise FileNotFoundError(f"task {task.name!r}: {task.path} does not exist")
    examples, rejects = [], []
    for line_no, obj, err in read_jsonl(task.path):
        try:
            if err:
                raise ValueError(err)
            examples.append(parse_example(obj))
        except ValueError as e:
            rejects.append({"task": task.name, "path": task.path, "line": line_no, "reason": str(e)})
    if not examples:
        raise ValueError(f"task {task.name!r}: {task.path} has no valid records ({len(rejects)} rejected)")
    if task.num_fewshot and len(examples) <= task.num_fewshot:
        raise ValueError(
            f"task {task.name!r}: num_fewshot={task.num_fewshot} needs more than "
            f"{task.num_fewshot} valid records, {task.path} has {len(examples)}"
        )
    return examples, rejects


def fewshot_context(examples: Sequence[Example], index: int, num_fewshot: int, seed: int) -> str:
    """The context of ``examples[index]`` with ``num_fewshot`` solved examples drawn from the others."""
    ex = examples[index]
    if not num_fewshot:
        return ex.context
    others = [i for i in range(len(examples)) if i != index]
    shots = random.Random(seed + index).sample(others, num_fewshot)
    solved = [examples[i].context + examples[i].choices[examples[i].gold] for i in shots]
    return FEWSHOT_DELIMITER.join([*solved, ex.context])


def encode_pair(tok: Tokenizer, context: str, continuation: str, chat: bool = False
                ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the lm-eval way; ``chat``: the context as a ChatML user turn and the
    continuation as the assistant's answer."""
    if chat:
        from stages.evaluate.generate import format_prompt

        context, continuation = format_prompt(context, chat=True), continuation.lstrip()
    n = len(context) - len(context.rstrip()) if not chat else 0  # the assistant header ends the context
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = tok.encode(context, add_special_tokens=False).ids
    return whole[: len(ctx)], whole[len(ctx) :]


def build_requests(
    task: TaskConfig, examples: list[Example], tok: Tokenizer, chat: bool = False
) -> list[tuple[list[int], list[int]]]:
    """One (context, continuation) token pair per choice of every scored example, example after example
    (``chat``: in the chat template, for instruction-tuned models)."""
    scored = examples[: task.limit] if task.limit else examples
    out = []
    for i, ex in enumerate(scored):
        context = fewshot_context(examples, i, task.num_fewshot, task.seed)
        out += [encode_pair(tok, context, choice, chat) for choice in ex.choices]
    return out


def task_metrics(
    name: str, examples: list[Example], logprobs: list[float], limit: int | None
) -> dict[str, float]:
    """``<name>/acc`` and ``<name>/acc_norm`` from the choices' log-likelihoods (in request order).
    Ties go to the first choice (``argmax``), as in lm-eval."""
    scored = examples[:limit] if limit else examples
    acc = acc_norm = 0
    k = 0
    for ex in scored:
        lls = logprobs[k : k + len(ex.choices)]
        k += len(ex.choices)
        norm = [ll / len(c) for ll, c in zip(lls, ex.choices, strict=True)]
        acc += int(max(range(len(lls)), key=lambda j: (lls[j], -j)) == ex.gold)
        acc_norm += int(max(range(len(norm)), key=lambda j: (norm[j], -j)) == ex.gold)
    if k != len(logprobs):
        raise ValueError(f"task {name!r}: {len(logprobs)} scores for {k} choices")
    n = len(scored)
    return {f"{name}/acc": acc / n, f"{name}/acc_norm": acc_norm / n}
