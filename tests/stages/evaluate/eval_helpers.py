"""Building blocks for the evaluate tests: a small corpus, tiny real models, tasks and preference pairs."""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from pipeline.stage import Output, Progress, StageContext
from pipeline.tracking import NullTracker
from stages.lm.hf import export_hf
from stages.lm.model import CausalLM, ModelConfig

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "while",
    "python",
    "reads",
    "files",
    "and",
    "returns",
    "a",
    "list",
    "of",
    "strings",
    "from",
    "each",
    "line",
    "in",
    "order",
    "café",
    "naïve",
    "résumé",
    "data",
    "model",
    "token",
    "value",
    "error",
]


def documents(n: int, seed: int = 0) -> list[str]:
    """Short English-like documents; every one starts with an ASCII word, some hold non-ASCII letters."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 30))]
        docs.append(f"Doc {i}: " + " ".join(words) + ".")
    return docs


def write_corpus(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    return path


def tiny_model(vocab_size: int, seed: int) -> CausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab_size,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=64,
        max_seq_len=128,
        rope_theta=10000.0,
    )
    return CausalLM(cfg)


def train_a_little(model: CausalLM, tokenize_dir: Path, steps: int, seed: int = 0) -> CausalLM:
    """A few AdamW steps on the train split, so that models really differ in quality."""
    from stages.lm.data import PackedDataset

    data = PackedDataset(tokenize_dir, "train")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        batch = data.batch(rng.integers(0, len(data), 8), doc_mask=True)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def export_stage(root: Path, stage: str, model: CausalLM, tokenizer_dir: Path) -> Path:
    """A finished training stage's directory: ``<root>/<stage>/model/``."""
    export_hf(model, str(tokenizer_dir), str(root / stage / "model"))
    return root / stage


def write_mc_task(path: Path, examples: list[dict], bad_lines: list[str] = ()) -> Path:
    lines = [json.dumps(e) for e in examples] + list(bad_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def mc_examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        choices = [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for _ in range(4)]
        out.append({"context": f"Which words follow item {i}?\nAnswer:", "choices": choices, "gold": i % 4})
    return out


def chatml(messages: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """ChatML text and the spans of the assistant contents + <|im_end|> after the first message."""
    text, spans = "", []
    for k, (role, content) in enumerate(messages):
        text += f"<|im_start|>{role}\n"
        if k > 0:
            spans.append((len(text), len(text) + len(content) + len("<|im_end|>")))
        text += f"{content}<|im_end|>\n"
    return text, spans


def write_dpo_pairs(dpo_dir: Path, tok, pairs: list[tuple[str, str, str]]) -> Path:
    """The dpo stage's held-out pairs file (``pairs/val.arrow``: ids and scored masks per side)."""
    cols: dict[str, list] = {"id": [], "chosen": [], "chosen_mask": [], "rejected": [], "rejected_mask": []}
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        cols["id"].append(f"p{i}")
        for side, answer in (("chosen", chosen), ("rejected", rejected)):
            text, spans = chatml([("user", prompt), ("assistant", answer)])
            enc = tok.encode(text, add_special_tokens=False)
            cols[side].append(enc.ids)
            cols[f"{side}_mask"].append([any(a <= s < b for a, b in spans) for s, _ in enc.offsets])
    table = pa.table(
        {
            "id": pa.array(cols["id"]),
            **{k: pa.array(v, pa.list_(pa.int32())) for k, v in cols.items() if k in ("chosen", "rejected")},
            **{k: pa.array(v, pa.list_(pa.bool_())) for k, v in cols.items() if k.endswith("_mask")},
        }
    )
    sink = io.BytesIO()
    with ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    (dpo_dir / "pairs").mkdir(parents=True, exist_ok=True)
    (dpo_dir / "pairs" / "val.arrow").write_bytes(sink.getvalue())
    return dpo_dir / "pairs" / "val.arrow"


def write_sft_val(sft_dir: Path, tokenizer_json: str, pairs: list[tuple[str, str, str]],
                  max_len: int) -> Path:
    """The sft stage's held-out split (``data/val.arrow``), written by the sft stage's own data step: each
    prompt with its chosen answer, packed."""
    from stages.sft.prepare import DataSpec, prepare

    records = sft_dir.parent / "sft-records.jsonl"
    lines = [json.dumps({"prompt": p, "completion": " " + c}) + "\n" for p, c, _ in pairs]
    records.write_text("".join(lines))
    spec = DataSpec(str(records), str(records), 0.0, max_len, True, "truncate")
    prepare(spec, tokenizer_json, str(sft_dir))
    return sft_dir / "data" / "val.arrow"


def context(out: Path, run_dir: Path, inputs: dict[str, list[Output]], tracker=None) -> StageContext:
    return StageContext(
        name="evaluate",
        out_dir=str(out),
        run_dir=str(run_dir),
        fingerprint="evalfp",
        inputs=inputs,
        tracker=tracker or NullTracker(),
        progress=Progress(None),
        logger=logging.getLogger("test.evaluate"),
    )
