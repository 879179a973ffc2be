"""The demo pipeline (configs/tiny.yaml) with SMALL settings, as ``-s`` overrides: every stage runs, on
absolute data paths (a job runs in its own working directory), in seconds per stage."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny.yaml"
TRAIN = "{steps: 4, micro_batch: 2, lr: 3.0e-3, min_lr: 3.0e-4, warmup: 1}"
SCALING = "{num_workers: 2, cpus_per_worker: 1, max_failures: 0}"


def small_overrides(data: Path, workdir: str, tracking_uri: str | None = None) -> list[str]:
    """``-s key=value`` strings for ``seedline run|submit configs/tiny.yaml``; ``data`` is the directory
    ``seedline example-data`` wrote."""
    out = [
        f"workdir={workdir}",
        f"stages.dedupe.input={data}/corpus/*.jsonl.gz",
        "stages.tokenize.tokenizer.train={vocab_size: 384, sample_docs: 200}",
        "stages.tokenize.seq_len=64",
        "stages.pretrain.model={preset: tiny, overrides: {dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, "
        "ffn_dim: 64}}",
        f"stages.pretrain.train={TRAIN}", f"stages.pretrain.scaling={SCALING}",
        "stages.pretrain.checkpoint={every: 2, keep: 2}", "stages.pretrain.eval={every: 2, batches: 1}",
        f"stages.sft.data={data}/instruct/train.jsonl", f"stages.sft.val={data}/instruct/val.jsonl",
        "stages.sft.max_len=64", f"stages.sft.train={TRAIN}", f"stages.sft.scaling={SCALING}",
        "stages.sft.checkpoint={every: 2}", "stages.sft.eval={every: 2, batches: 1}",
        f"stages.dpo.data={data}/prefs/train.jsonl", f"stages.dpo.val={data}/prefs/val.jsonl",
        "stages.dpo.max_len=64", "stages.dpo.max_prompt_len=32", f"stages.dpo.train={TRAIN}",
        f"stages.dpo.scaling={SCALING}", "stages.dpo.checkpoint={every: 2}",
        "stages.dpo.eval={every: 2, batches: 1}",
        f"stages.evaluate.tasks=[{{name: mc, path: {data}/eval/mc.jsonl, num_fewshot: 1, limit: 16}}]",
        f"stages.evaluate.prompts={data}/eval/prompts.jsonl", "stages.evaluate.max_new_tokens=4",
        "stages.evaluate.perplexity={enabled: true, batches: 2}",
    ]
    if tracking_uri:
        out.append(f"tracking.uri={tracking_uri}")
    return out


def as_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("-s", o)]
