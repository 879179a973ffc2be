"""Perplexity and bits per byte on the tokenize stage's ``val`` split.

Rows are scored as the trainer sees them (``PackedDataset.batch``), by default with document masks (a
token attends only to its own document, as lm-eval scores documents one by one; ``doc_mask: false``
attends across the documents of a row, as a model pretrained without masks was trained). Every target
token of the split is scored once (rows overlap by one token), so:

- ``loss`` = mean negative log-likelihood per target token (end-of-text tokens included), as the
  trainer's ``eval_loss``; ``perplexity`` = exp(loss);
- ``bits_per_byte`` = -sum(ll) / bytes / ln 2 (lm-eval's definition) over the *text* tokens: special
  tokens (end-of-text) carry no bytes and are left out of both sums, so tokenizers of different
  vocabularies compare on the same bytes. A token's bytes are its UTF-8 bytes (see ``token_bytes``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from stages.lm.data import IGNORE_INDEX, PackedDataset


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: each character of a byte-level token is one byte."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_bytes(tokenizer_json: str, vocab_size: int) -> np.ndarray:
    """(vocab_size,) int64: the UTF-8 byte length of each token's text; 0 for added/special tokens and
    ids the tokenizer does not have.

    Byte-level BPE (the tokenize stage's, GPT-2's): a token's characters map one to one to bytes, so
    this is exact. SentencePiece-style vocabularies: ``▁`` is a space and ``<0xNN>`` one byte.
    """
    spec = json.loads(tokenizer_json)
    vocab: dict[str, int] = spec["model"]["vocab"]
    special = {t["id"] for t in spec.get("added_tokens", [])}
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    decoder = _byte_decoder()
    out = np.zeros(vocab_size, np.int64)
    for tok, i in vocab.items():
        if i >= vocab_size or i in special:
            continue
        if byte_level:
            if any(c not in decoder for c in tok):
                raise ValueError(f"token {tok!r} is not in the byte-level alphabet")
            out[i] = len(tok)
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            out[i] = 1
        else:
            out[i] = len(tok.replace("\u2581", " ").encode("utf-8"))
    return out


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module,
    dataset: PackedDataset,
    tok_bytes: np.ndarray,
    batch_size: int,
    batches: int,
    device: torch.device,
    doc_mask: bool = True,
) -> tuple[dict[str, float], dict]:
    """(metrics, counts) on the first ``batches`` batches of rows (0 = all rows), in row order."""
    rows = len(dataset) if batches == 0 else min(len(dataset), batches * batch_size)
    if rows == 0:
        raise ValueError(f"the {dataset.split} split of {dataset.root} has no rows to score")
    nll_all, n_all, nll_text, n_text, n_bytes = 0.0, 0, 0.0, 0, 0
    byte_table = torch.tensor(tok_bytes)
    for start in range(0, rows, batch_size):
        batch = dataset.batch(list(range(start, min(rows, start + batch_size))), doc_mask=doc_mask)
        labels = batch["labels"]
        logits = model(
            batch["input_ids"].to(device),
            position_ids=batch["position_ids"].to(device),
            doc_mask=batch["doc_mask"].to(device) if doc_mask else None,
        ).logits.float()
        nll = (
            F.cross_entropy(
                logits.flatten(0, 1), labels.to(device).flatten(), ignore_index=IGNORE_INDEX, reduction="none"
            )
            .double()
            .cpu()
            .view_as(labels)
        )
        valid = labels != IGNORE_INDEX
        nbytes = byte_table[labels.clamp(min=0)] * valid
        text = nbytes > 0
        nll_all += float(nll[valid].sum())
        n_all += int(valid.sum())
        nll_text += float(nll[text].sum())
        n_text += int(text.sum())
        n_bytes += int(nbytes.sum())
    loss = nll_all / n_all
    metrics = {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nll_text / n_bytes / math.log(2) if n_bytes else float("nan"),
    }
    counts = {"rows": rows, "tokens": n_all, "text_tokens": n_text, "bytes": n_bytes}
    return metrics, counts
