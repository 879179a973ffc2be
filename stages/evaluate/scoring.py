"""Log-likelihood of token spans under a causal LM, batched (the core of multiple choice and preferences).

A *request* is a token sequence and a mask of the tokens to score: the result is the summed log-probability
of the masked tokens, each given every token before it, and whether each of them is the model's greedy
choice (lm-eval's ``is_greedy``). Sequences longer than the model's context lose tokens from the left, as
lm-eval does; the first token is never scored (nothing predicts it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Request:
    """``ids``: the token sequence; ``score``: per token, whether its log-probability is summed."""

    ids: tuple[int, ...]
    score: tuple[bool, ...]

    @staticmethod
    def continuation(context: list[int], continuation: list[int]) -> Request:
        """Score ``continuation`` given ``context`` (lm-eval's ``loglikelihood`` request)."""
        if not context or not continuation:
            raise ValueError("a log-likelihood request needs a non-empty context and continuation")
        return Request(
            tuple(context) + tuple(continuation), (False,) * len(context) + (True,) * len(continuation)
        )


@dataclass(frozen=True)
class Score:
    logprob: float  # sum over the scored tokens
    tokens: int  # scored tokens (after truncation)
    greedy: bool  # every scored token is the argmax


def _fit(req: Request, max_len: int) -> Request:
    """Keep the last ``max_len + 1`` tokens (inputs are ``ids[:-1]``); the first kept token is context."""
    if len(req.ids) <= max_len + 1:
        return req
    cut = len(req.ids) - (max_len + 1)
    return Request(req.ids[cut:], (False,) + req.score[cut + 1 :])


@torch.no_grad()
def score_requests(
    model: torch.nn.Module, requests: list[Request], batch_size: int, device: torch.device
) -> list[Score]:
    """Scores of ``requests`` in their order. Batches hold sequences of similar length (longest first),
    right-padded: padding comes after every real token, so it never changes a real token's logits."""
    max_len = model.cfg.max_seq_len
    fitted = [_fit(r, max_len) for r in requests]
    order = sorted(range(len(fitted)), key=lambda i: (-len(fitted[i].ids), i))
    out: list[Score | None] = [None] * len(fitted)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        T = max(len(fitted[i].ids) for i in idx) - 1
        ids = torch.zeros((len(idx), T + 1), dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.bool)
        for j, i in enumerate(idx):
            r = fitted[i]
            ids[j, : len(r.ids)] = torch.tensor(r.ids)
            mask[j, : len(r.ids) - 1] = torch.tensor(r.score[1:])
        ids, mask = ids.to(device), mask.to(device)
        logits = model(ids[:, :-1]).logits.float()  # (B, T, V)
        logp = F.log_softmax(logits, dim=-1)
        target = ids[:, 1:]
        tok_lp = logp.gather(-1, target[..., None]).squeeze(-1)  # (B, T)
        greedy = (logits.argmax(-1) == target) | ~mask
        sums = (tok_lp.double() * mask).sum(-1).cpu()
        counts = mask.sum(-1).cpu()
        all_greedy = greedy.all(-1).cpu()
        for j, i in enumerate(idx):
            out[i] = Score(float(sums[j]), int(counts[j]), bool(all_greedy[j]))
    return out  # type: ignore[return-value]
