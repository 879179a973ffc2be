"""Shared assets of the dpo tests: a small BPE tokenizer trained on the test pairs (no downloads), a tiny
model exported as a Hugging Face directory, and preference files in both TRL formats."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

WORDS = ("return", "encode", "decode", "the", "a", "list", "of", "string", "bytes", "value", "file",
         "path", "parse", "read", "write", "json", "object", "number", "integer", "float", "open",
         "close", "socket", "buffer", "stream", "line", "text", "table", "key", "map", "sort", "filter",
         "copy", "new", "default", "error", "raise", "check", "time", "date", "zone", "format", "name",
         "module", "class", "call")


def summary(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."


def make_records(n: int, seed: int) -> list[dict]:
    """``n`` preference records: every fifth conversational (one with a system turn), the rest strings."""
    rng = random.Random(seed)
    names = [f"mod{seed}_{i % 7}.func{i}" for i in range(n)]
    answers = [summary(rng) for _ in range(n)]
    out = []
    for i, name in enumerate(names):
        question, chosen, rejected = f"What does `{name}` do?", answers[i], answers[(i + 1 + i % 3) % n]
        if i % 5 == 4:
            prompt = [{"role": "user", "content": question}]
            if i % 10 == 9:
                prompt.insert(0, {"role": "system", "content": "You are a documentation assistant."})
            out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            out.append({"prompt": question, "chosen": chosen, "rejected": rejected})
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@dataclass(frozen=True)
class Assets:
    root: Path
    tokenizer_dir: str
    model_dir: str
    train: str
    val: str


@pytest.fixture(scope="session")
def dpo_assets(tmp_path_factory) -> Assets:
    import torch

    from stages.lm.hf import export_hf
    from stages.lm.model import CausalLM, ModelConfig
    from stages.tokenize.config import TrainTokenizer
    from stages.tokenize.tokenizer import save, train_bpe, vocab_size

    root = tmp_path_factory.mktemp("dpo-assets")
    train, val = make_records(48, seed=1), make_records(12, seed=2)
    texts = [json.dumps(r) for r in train + val] * 4
    tok = train_bpe(texts, TrainTokenizer(vocab_size=400, sample_docs=1000))
    save(tok, str(root / "tokenizer"), model_max_length=256)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size(tok), dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=256)
    export_hf(CausalLM(cfg), str(root / "tokenizer"), str(root / "model"))
    return Assets(root, str(root / "tokenizer"), str(root / "model"),
                  str(write_jsonl(root / "prefs" / "train.jsonl", train)),
                  str(write_jsonl(root / "prefs" / "val.jsonl", val)))
