"""The model card: ``README.md`` in every exported model directory, saying what produced the model.

What stage of which run (and its fingerprint), the data it was trained on, how many optimizer steps and
tokens, the final metrics, the architecture, and how to load it with ``transformers`` (or as GGUF). The
card is written after training, beside the weights, so a directory copied elsewhere still explains itself.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage

CARD = "README.md"
DATA_KEYS = ("input", "data", "val", "init_from")  # config keys that name what a stage trained on


@dataclass
class CardInfo:
    """Facts for the card; every field is plain data."""

    stage: str
    run_dir: str
    fingerprint: str
    steps: int
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # config key -> path(s)
    upstream: dict[str, str] = field(default_factory=dict)  # upstream stage instance -> fingerprint
    settings: dict[str, Any] = field(default_factory=dict)  # a few training settings worth knowing


def count_parameters(model_dir: Path, cfg: dict[str, Any]) -> int:
    """Parameters stored in the directory's safetensors files (headers only; nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def _architecture(cfg: dict[str, Any], params: int) -> str:
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    kv_text = f" ({kv} key/value heads)" if kv and kv != heads else ""
    tied = ", tied input/output embeddings" if cfg.get("tie_word_embeddings") else ""
    return (f"`{(cfg.get('architectures') or ['LlamaForCausalLM'])[0]}`, {params:,} parameters: "
            f"{cfg.get('num_hidden_layers')} layers, hidden size {cfg.get('hidden_size')}, {heads} attention "
            f"heads{kv_text}, feed-forward {cfg.get('intermediate_size')}, vocabulary "
            f"{cfg.get('vocab_size')}, context {cfg.get('max_position_embeddings')} tokens{tied}; "
            f"weights {cfg.get('torch_dtype', 'float32')} safetensors.")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        return ", ".join(f"`{x}`" for x in v)
    return f"`{v}`"


def _load_snippet(path: str, chat: bool) -> str:
    lines = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'path = "{path}"', "tokenizer = AutoTokenizer.from_pretrained(path)",
             "model = AutoModelForCausalLM.from_pretrained(path)"]
    if chat:
        lines += ['messages = [{"role": "user", "content": "What does open() return?"}]',
                  "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
                  'return_tensors="pt", return_dict=True)',
                  'end = tokenizer.convert_tokens_to_ids("<|im_end|>")',
                  "out = model.generate(**ids, max_new_tokens=40, eos_token_id=end)",
                  'print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))']
    else:
        lines += ['ids = tokenizer("def read_file(path):", return_tensors="pt")',
                  "out = model.generate(**ids, max_new_tokens=40)",
                  "print(tokenizer.decode(out[0]))"]
    return "\n".join([*lines, "```"])


def render_card(info: CardInfo, cfg: dict[str, Any], params: int, model_path: str, chat: bool) -> str:
    """The card's Markdown (with the Hugging Face Hub's YAML header)."""
    run_name = info.run_dir.rstrip("/").rsplit("/", 1)[-1]
    written = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = ["---", "library_name: transformers", "pipeline_tag: text-generation",
           "tags: [seedline, llama]", "---", "", f"# {run_name} / {info.stage}", "",
           f"Produced by the Seedline stage `{info.stage}` of the run `{run_name}` ({written}).", "",
           "| | |", "|---|---|", f"| stage | `{info.stage}`, fingerprint `{info.fingerprint}` |",
           f"| run directory | `{info.run_dir}` |", f"| this directory | `{model_path}` |", "",
           "## Model", "", _architecture(cfg, params), "", "## Data", ""]
    out += [f"- `{k}`: {_fmt(v)}" for k, v in info.data.items()] or ["- the upstream stages' outputs"]
    if info.upstream:
        ups = ", ".join(f"`{k}` (`{v}`)" for k, v in sorted(info.upstream.items()))
        out.append(f"- upstream stages: {ups}")
    out += ["", "## Training", "", f"- optimizer steps: {info.steps:,}",
            f"- tokens trained on: {info.tokens:,}"]
    out += [f"- {k}: {_fmt(v)}" for k, v in info.settings.items()]
    out += ["", "## Final metrics", ""]
    if info.metrics:
        out += ["| metric | value |", "|---|---|"]
        out += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                for k, v in sorted(info.metrics.items())]
    else:
        out.append("none recorded")
    gguf = f"seedline export gguf {info.run_dir} --stage {info.stage}"
    out += ["", "`metrics.jsonl` beside this directory has every step; the run's MLflow store the curves.",
            "", "## How to load", "", _load_snippet(model_path, chat), "",
            f"As a GGUF file (llama.cpp, Ollama): `{gguf}`.", ""]
    return "\n".join(out)


def write_model_card(model_dir: str, info: CardInfo) -> str:
    """Write ``<model_dir>/README.md`` for the exported model there (local path); returns its path."""
    root = storage.local(model_dir)
    if root is None:
        raise ValueError(f"{model_dir}: the model card is written into a local model directory")
    cfg = json.loads((root / "config.json").read_text())
    tok_cfg = root / "tokenizer_config.json"
    chat = tok_cfg.is_file() and bool(json.loads(tok_cfg.read_text()).get("chat_template"))
    path = storage.join(model_dir, CARD)
    storage.write_text(path, render_card(info, cfg, count_parameters(root, cfg), str(root.resolve()), chat))
    return path


def card_info(ctx, config, steps: int, tokens: int, metrics: dict[str, float]) -> CardInfo:
    """The card's facts for a training stage: ``ctx`` its ``StageContext``, ``config`` its
    ``TrainingStageConfig``."""
    data = {k: getattr(config, k) for k in DATA_KEYS if getattr(config, k, None)}
    train, sc = config.train, config.scaling
    elastic = "" if sc.min_workers == sc.max_workers else f" (elastic {sc.min_workers}-{sc.max_workers})"
    settings = {"batch": f"{train.micro_batch} rows x {train.grad_accum} accumulation x {sc.max_workers} "
                         f"worker(s){elastic}",
                "learning rate": train.lr, "ZeRO stage": config.deepspeed.zero_stage}
    return CardInfo(stage=ctx.name, run_dir=ctx.run_dir, fingerprint=ctx.fingerprint, steps=steps,
                    tokens=tokens, metrics=dict(metrics), data=data,
                    upstream=dict(getattr(ctx, "lineage", {}) or {}), settings=settings)
