"""Shared pieces of the sft tests: a small real tokenizer trained by the tokenize stage's own code, and
synthetic chat records shaped like the demo instruction set."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

from pipeline.stage import Progress, StageContext
from pipeline.tracking import NullTracker
from stages.tokenize import tokenizer as tk
from stages.tokenize.config import TrainTokenizer

SYSTEM = "You are a Python documentation assistant."
WORDS = ["return", "the", "value", "of", "an", "object", "as", "a", "string", "list", "with", "items",
         "sorted", "by", "key", "and", "raise", "an", "error", "when", "the", "file", "is", "missing",
         "or", "path", "cannot", "be", "opened", "for", "reading", "in", "binary", "mode"]
# The ChatML rendering with transformers' {% generation %} markers: transformers then computes the
# assistant-token mask itself (return_assistant_tokens_mask), an independent check of sft's loss mask.
GENERATION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
)
MODULES = ("json", "os", "re", "math", "shutil", "random", "string", "textwrap", "heapq", "bisect")


def summary(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def records(n: int, seed: int = 0) -> list[dict]:
    """Mostly ``messages`` (some with a system turn, some multi-turn), some ``prompt``/``completion``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name = f"{rng.choice(MODULES)}.f{i}"
        answer = summary(rng, rng.randint(6, 24))
        question = f"What does `{name}` do?"
        kind = i % 5
        if kind == 4:
            out.append({"prompt": f"Summarise `{name}`.", "completion": answer})
            continue
        msgs = [{"role": "system", "content": SYSTEM}] if kind in (1, 3) else []
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if kind == 3:  # a second turn
            msgs += [{"role": "user", "content": "And in one word?"},
                     {"role": "assistant", "content": rng.choice(WORDS)}]
        out.append({"messages": msgs})
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def train_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE with the Seedline special tokens and ChatML template (tokenize stage code)."""
    texts = [SYSTEM] + [json.dumps(r) for r in records(300, seed=99)]
    tok = tk.train_bpe(texts, TrainTokenizer(vocab_size=vocab_size, min_frequency=2))
    tk.save(tok, str(out_dir), 256)
    return out_dir


def stage_context(out: Path, ray_address: str | None, tracker=None) -> StageContext:
    return StageContext(name="sft", out_dir=str(out), run_dir=str(out.parent), fingerprint="test",
                        inputs={}, tracker=tracker or NullTracker(), progress=Progress(None),
                        logger=logging.getLogger("sft-test"), ray_address=ray_address)


def run_killed(config: dict, out: Path, ray_address: str, kill_at: int) -> subprocess.CompletedProcess:
    """The sft stage in its own process whose driver is killed (exit 137) once checkpoint ``kill_at`` is
    complete (``SEEDLINE_TRAIN_KILL_AT_STEP``): a ``seedline run`` that died mid-stage."""
    cfg_path = out.parent / f"{out.name}-config.json"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(config))
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "SEEDLINE_TRAIN_KILL_AT_STEP": str(kill_at), "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, __file__, str(cfg_path), str(out), ray_address], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


if __name__ == "__main__":  # `python sft_helpers.py CONFIG.json OUT_DIR RAY_ADDRESS`: the stage, own process
    from stages.sft.config import SFTConfig
    from stages.sft.run import run

    cfg_file, out_dir, address = sys.argv[1:4]
    run(SFTConfig(**json.loads(Path(cfg_file).read_text())), stage_context(Path(out_dir), address))
