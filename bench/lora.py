"""Benchmark: LoRA against full fine-tuning for sft and dpo on the same model, in one process run.

    DS_ACCELERATOR=cpu .venv/bin/python bench/lora.py [--dim 512] [--layers 6] [--steps 6] [--warmup 2]
        [--micro-batch 4] [--rank 16] [--workers 1]

Writes the demo data (real text: instruction and preference pairs made from the standard library's pydoc
pages), trains a 2048-token BPE on its corpus, builds a base model (random weights, ``--dim``/``--layers``)
and runs the real sft and dpo stages (Ray Train workers, DeepSpeed ZeRO-2) on the same rows: sft full and
LoRA (all-linear, ``--rank``); dpo full and LoRA, both with the precomputed reference (the like-for-like
ratio), and LoRA with the base as the reference (adapters disabled: LoRA's default, one more forward per
step, no reference pass before training). For each it prints tokens/s (median of the trainer's per-step
timing after ``--warmup`` steps) and peak memory of the busiest worker (peak RSS on CPU, i.e. runtime +
model + gradients + optimizer state + activations; max allocated memory on a GPU), then the ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

def make_inputs(root: Path, dim: int, layers: int) -> dict[str, str]:
    """The demo's real data (``seedline example-data``: instruction and preference pairs from the standard
    library's pydoc pages), a 2048-token BPE trained on its corpus, and a base model (HF directory)."""
    import gzip

    import torch

    from pipeline.example_data import write_all
    from stages.lm.hf import export_hf
    from stages.lm.model import CausalLM, ModelConfig
    from stages.tokenize.config import TrainTokenizer
    from stages.tokenize.tokenizer import save, train_bpe, vocab_size

    demo = write_all(root / "demo-data")
    pages = [json.loads(line)["text"] for p in sorted((demo / "corpus").glob("*.jsonl.gz"))
             for line in gzip.decompress(p.read_bytes()).decode().splitlines()]
    tok = train_bpe(pages, TrainTokenizer(vocab_size=2048, sample_docs=2000))
    save(tok, str(root / "tok"), model_max_length=256)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size(tok), dim=dim, n_layers=layers, n_heads=dim // 64,
                      n_kv_heads=max(1, dim // 128), max_seq_len=256)
    export_hf(CausalLM(cfg), str(root / "tok"), str(root / "base"))
    return {"base": str(root / "base"), "chats": str(demo / "instruct" / "train.jsonl"),
            "pairs": str(demo / "prefs" / "train.jsonl")}


def run_stage(kind: str, lora: bool, inputs: dict[str, str], root: Path, args,
              reference: str = "precompute") -> dict[str, float]:
    """One stage run; its median tokens/s, peak memory and trainable share."""
    from pipeline.stage import Progress, StageContext
    from pipeline.tracking import NullTracker

    common = {"init_from": inputs["base"], "log_every": 10**6, "checkpoint": {"every": 10**6, "keep": 1},
              "eval": {"every": 0, "batches": 1}, "val_fraction": 0.05,
              "scaling": {"num_workers": args.workers, "use_gpu": args.gpu},
              "train": {"steps": args.steps, "micro_batch": args.micro_batch, "warmup": 1,
                        "lr": 1e-3 if lora else 1e-4, "min_lr": 1e-5}}
    if lora:
        common["lora"] = {"rank": args.rank, "alpha": 2 * args.rank, "targets": "all-linear"}
    if kind == "sft":
        from stages.sft.config import SFTConfig as Config
        from stages.sft.run import run
        cfg = Config(data=inputs["chats"], max_len=256, **common)
    else:
        from stages.dpo.config import DPOConfig as Config
        from stages.dpo.run import run
        cfg = Config(data=inputs["pairs"], max_len=128, max_prompt_len=32, reference=reference, **common)
    out = root / f"{kind}-{'lora' if lora else 'full'}-{reference}"
    ctx = StageContext(name=kind, out_dir=str(out), run_dir=str(root), fingerprint="bench", inputs={},
                       tracker=NullTracker(), progress=Progress(None), logger=logging.getLogger("bench"),
                       ray_num_cpus=max(2, args.workers))
    run(cfg, ctx)
    perf = [json.loads(ln) for ln in (out / "perf.jsonl").read_text().splitlines()]
    result = json.loads((out / "fit_result.json").read_text())
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in perf[args.warmup:]),
            "peak_memory_mb": result["peak_memory_mb"],
            "trainable_share": result["params"]["trainable_share"],
            "params": result["params"]["total_params"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    import torch

    args.gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if args.gpu else f"CPU ({os.cpu_count()} cores), 1 thread/worker"
    with tempfile.TemporaryDirectory(prefix="seedline-bench-lora-") as tmp:
        inputs = make_inputs(Path(tmp), args.dim, args.layers)
        results = {(k, lo): run_stage(k, lo, inputs, Path(tmp), args)
                   for k in ("sft", "dpo") for lo in (False, True)}
        in_memory = run_stage("dpo", True, inputs, Path(tmp), args, reference="in_memory")
    n = results[("sft", False)]["params"]
    print(f"model: dim {args.dim}, {args.layers} layers, {n / 1e6:.1f}M params; {args.workers} worker(s), "
          f"ZeRO-2, micro-batch {args.micro_batch}, {args.steps} steps (median after {args.warmup}); "
          f"{device}")
    memory = "peak allocated" if args.gpu else "peak RSS"
    for (kind, lora), r in results.items():
        name = f"lora r={args.rank}" if lora else "full"
        print(f"{kind} {name:>10}: {r['tokens_per_s']:,.0f} tokens/s, "
              f"{memory} {r['peak_memory_mb']:,.0f} MiB, trainable {r['trainable_share'] * 100:.2f}%")
    r = in_memory
    print(f"dpo lora r={args.rank}, base as reference: {r['tokens_per_s']:,.0f} tokens/s, "
          f"{memory} {r['peak_memory_mb']:,.0f} MiB")
    for kind in ("sft", "dpo"):
        full, lora = results[(kind, False)], results[(kind, True)]
        print(f"{kind} lora/full: tokens/s {lora['tokens_per_s'] / full['tokens_per_s']:.2f}x, "
              f"{memory} {lora['peak_memory_mb'] / full['peak_memory_mb']:.2f}x "
              f"({full['peak_memory_mb'] - lora['peak_memory_mb']:+,.0f} MiB saved)"
              + (" (both with the precomputed reference)" if kind == "dpo" else ""))


if __name__ == "__main__":
    main()
