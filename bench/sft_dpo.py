"""Benchmark: Seedline's sft and dpo stages against TRL's SFTTrainer and DPOTrainer, in one process run.

    DS_ACCELERATOR=cpu .venv/bin/python -m bench.sft_dpo [--dim 256] [--layers 4] [--steps 30]
        [--micro-batch 8] [--max-len 256] [--workers 1]

Same base model (random weights, ``--dim``/``--layers``, a 2048-token BPE trained on the demo corpus),
same real data (the demo's instruction and preference pairs, made from the standard library's pydoc
pages), same max length, micro-batch, steps, learning rate and schedule (warmup 3, cosine), fp32 on CPU,
the same number of cores: Seedline trains on ``--workers`` Ray Train workers (1 thread each), TRL in this
process with ``--workers`` torch threads and the same global batch (micro-batch x workers). sft packs
examples into rows of ``--max-len`` tokens in both (TRL: ``packing=True``, loss on the completion); dpo
is the sigmoid loss, beta 0.1, with the reference's log-probabilities computed before training in both
(TRL: ``precompute_ref_log_probs``), each batch padded to its longest sequence.

Printed per system and stage:
- wall: the whole run. Seedline: the stage's ``run()`` (data preparation, baseline evaluation, reference
  pass, Ray Train controller and workers, DeepSpeed, training, export, model card), with a Ray already
  running as in a pipeline (Ray's own start is printed once, apart). TRL: loading the model, tokenizing
  the data, building the trainer, the reference pass, training and ``save_model``.
- train: the training loop only (Seedline: the sum of per-step times; TRL: ``train_runtime`` less its
  reference pass), its tokens/s (real, non-padding tokens through the model per second: sft the packed
  rows' tokens, dpo the chosen and rejected sequences) and the median step time.
Then the ratios Seedline / TRL: end to end (TRL wall / Seedline wall) and training tokens/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

WARMUP, LR, MIN_LR, BETA = 3, 1e-4, 1e-5, 0.1


def seedline_stage(kind: str, inputs: dict[str, str], root: Path, args) -> dict[str, float]:
    """One Seedline stage run (a Ray is already up): wall seconds, training seconds, tokens, step times."""
    from pipeline.stage import Progress, StageContext
    from pipeline.tracking import NullTracker

    common = {"init_from": inputs["base"], "log_every": 10**6, "checkpoint": {"every": 10**6, "keep": 1},
              "eval": {"every": 0, "batches": 1}, "val": inputs[f"{kind}_val"], "max_len": args.max_len,
              "scaling": {"num_workers": args.workers},
              "train": {"steps": args.steps, "micro_batch": args.micro_batch, "warmup": WARMUP, "lr": LR,
                        "min_lr": MIN_LR}}
    if kind == "sft":
        from stages.sft.config import SFTConfig as Config
        from stages.sft.run import run
        cfg = Config(data=inputs["sft"], **common)
    else:
        from stages.dpo.config import DPOConfig as Config
        from stages.dpo.run import run
        cfg = Config(data=inputs["dpo"], max_prompt_len=args.max_len // 2, beta=BETA, reference="precompute",
                     **common)
    out = root / f"seedline-{kind}"
    ctx = StageContext(name=kind, out_dir=str(out), run_dir=str(root), fingerprint="bench", inputs={},
                       tracker=NullTracker(), progress=Progress(None), logger=logging.getLogger("bench"),
                       ray_num_cpus=max(2, args.workers))
    start = time.perf_counter()
    run(cfg, ctx)
    wall = time.perf_counter() - start
    perf = [json.loads(ln) for ln in (out / "perf.jsonl").read_text().splitlines()]
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = max(r.get("tokens", 0) for r in metrics)
    steps = [r["step_time_s"] for r in perf]
    return {"wall": wall, "train": sum(steps), "tokens": tokens,
            "step": statistics.median(steps[2:] or steps)}


def _chatml_split(messages: list[dict]) -> tuple[str, str]:
    """A conversation ending with an assistant turn as (prompt, completion) in Seedline's ChatML."""
    from stages.sft.chat import render

    text, spans = render(messages)
    start, end = spans[-1]
    return text[:start], text[start:end]


def _count_tokens(trainer, keys: tuple[str, ...]) -> list[int]:
    """Count the real tokens of every micro-batch the trainer trains on (not the batches its data loader
    collates ahead)."""
    counted = [0]
    step = trainer.training_step

    def training_step(model, inputs, *a, **k):
        masks = [key for key in keys if key in inputs]
        # padding-free packed rows (no mask): every id is a real token
        counted[0] += (sum(int(inputs[key].sum()) for key in masks) if masks
                       else int(inputs["input_ids"].numel()))
        return step(model, inputs, *a, **k)

    trainer.training_step = training_step
    return counted


def trl_stage(kind: str, inputs: dict[str, str], root: Path, args) -> dict[str, float]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback

    torch.set_num_threads(args.workers)
    steps: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append(time.perf_counter() - self.t0)

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(inputs["base"])
    model = LlamaForCausalLM.from_pretrained(inputs["base"], dtype=torch.float32)
    common = dict(output_dir=str(root / f"trl-{kind}"), max_steps=args.steps,
                  # the same global batch: Seedline's workers x micro-batch
                  per_device_train_batch_size=args.micro_batch * args.workers, gradient_accumulation_steps=1,
                  learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=WARMUP, weight_decay=0.0,
                  logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True,
                  dataloader_num_workers=0, max_length=args.max_len, seed=0, disable_tqdm=True,
                  # like Seedline on CPU: fp32, no activation checkpointing (TRL defaults to bf16 and to
                  # gradient checkpointing)
                  bf16=False, gradient_checkpointing=False)
    rows = [json.loads(line) for line in Path(inputs[kind]).read_text().splitlines() if line.strip()]
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        from stages.sft.chat import to_messages

        pairs = [_chatml_split(to_messages(r)) for r in rows]
        data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
        cfg = SFTConfig(packing=True, completion_only_loss=True, **common)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                             callbacks=[StepTimes()])
        counted = _count_tokens(trainer, ("attention_mask",))
    else:
        from trl import DPOConfig, DPOTrainer

        from stages.dpo.data import to_pair

        def split(r: dict, i: int) -> dict[str, str]:
            pair = to_pair(r, str(i))
            prompt, chosen = _chatml_split(pair.chosen)
            return {"prompt": prompt, "chosen": chosen, "rejected": _chatml_split(pair.rejected)[1]}

        data = Dataset.from_list([split(r, i) for i, r in enumerate(rows)])
        cfg = DPOConfig(beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=True, **common)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                             callbacks=[StepTimes()])
        counted = _count_tokens(trainer, ("attention_mask", "chosen_attention_mask",
                                          "rejected_attention_mask"))
    trainer.train()
    trainer.save_model(str(root / f"trl-{kind}" / "model"))
    wall = time.perf_counter() - start
    train = sum(steps)
    return {"wall": wall, "train": train, "tokens": counted[0],
            "step": statistics.median(steps[2:] or steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--stages", default="sft,dpo", help="which to compare (comma-separated)")
    args = ap.parse_args()
    from bench.lora import make_inputs
    from pipeline.ray_init import init_ray

    with tempfile.TemporaryDirectory(prefix="seedline-bench-trl-") as tmp:
        root = Path(tmp)
        made = make_inputs(root, args.dim, args.layers)
        demo = Path(made["chats"]).parent.parent
        inputs = {"base": made["base"], "sft": made["chats"], "dpo": made["pairs"],
                  "sft_val": str(demo / "instruct" / "val.jsonl"),
                  "dpo_val": str(demo / "prefs" / "val.jsonl")}
        t0 = time.perf_counter()
        init_ray(None, max(2, args.workers))
        ray_start = time.perf_counter() - t0
        results = {}
        kinds = [k for k in ("sft", "dpo") if k in args.stages.split(",")]
        for kind in kinds:
            results[(kind, "trl")] = trl_stage(kind, inputs, root, args)
            results[(kind, "seedline")] = seedline_stage(kind, inputs, root, args)
    print(f"model: dim {args.dim}, {args.layers} layers, vocab 2048; {args.steps} steps, micro-batch "
          f"{args.micro_batch}, max length {args.max_len}, fp32 CPU, {args.workers} core(s): Seedline "
          f"{args.workers} worker(s), TRL {args.workers} thread(s); data: the demo's real pairs")
    print(f"Seedline's Ray start (once per pipeline run, not in the walls below): {ray_start:.1f}s")
    for kind in kinds:
        for system in ("seedline", "trl"):
            r = results[(kind, system)]
            print(f"{kind} {system:>8}: wall {r['wall']:6.1f}s, train {r['train']:6.1f}s, "
                  f"{r['tokens'] / r['train']:8,.0f} tokens/s ({r['tokens']:,} tokens), "
                  f"step {r['step']:.3f}s")
        s, t = results[(kind, "seedline")], results[(kind, "trl")]
        print(f"{kind} seedline/trl: end to end {t['wall'] / s['wall']:.2f}x, training tokens/s "
              f"{(s['tokens'] / s['train']) / (t['tokens'] / t['train']):.2f}x, step time "
              f"{t['step'] / s['step']:.2f}x")


if __name__ == "__main__":
    main()
