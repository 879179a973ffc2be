"""Benchmark: the pretrain stage's training throughput, 2 workers against 1, and against a plain loop.

    DS_ACCELERATOR=cpu .venv/bin/python bench/pretrain.py [--data runs/tiny/tokenize-*] [--steps 24]
        [--warmup 4] [--micro-batch 8] [--preset tiny] [--workers 1,2]

``--data`` is a tokenize stage output (default: the newest ``runs/*/tokenize-*``; make one with
``seedline example-data demo-data && seedline run configs/tiny.yaml --only tokenize``). In one process run
it times, on the same rows and model shape:

- **anchor**: a plain single-process PyTorch loop (the model, ``torch.optim.AdamW``, the same batches and
  clipping; 1 thread per process like each worker), no Ray, no DeepSpeed;
- **seedline**: the real trainer (Ray Train ``TorchTrainer``, DeepSpeed ZeRO-2, gloo) with each worker
  count in ``--workers`` (1 CPU per worker); each worker gets ``--micro-batch`` rows per step.

Throughput is tokens per second over all workers, the median of the timed steps after ``--warmup`` (the
trainer's own per-step timing from ``perf.jsonl``: forward, backward, optimizer step and gradient
all-reduce; checkpoints and validation are outside it). With a CUDA device the trainer also reports MFU
against the device's bf16 peak (``stages/lm/flops.py``); on CPU there is no peak, so no MFU.
"""

from __future__ import annotations

import argparse
import glob
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


def default_data() -> str:
    found = sorted(glob.glob(str(ROOT / "runs" / "*" / "tokenize-*" / "manifest.json")), key=os.path.getmtime)
    if not found:
        sys.exit("no tokenize output under runs/: run `seedline example-data demo-data && "
                 "seedline run configs/tiny.yaml --only tokenize` or pass --data")
    return str(Path(found[-1]).parent)


def anchor_tokens_per_s(task, args) -> float:
    """Plain PyTorch: same model, rows, AdamW and clipping, one process with one thread."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    loader = task.train_loader(0, 1, args.micro_batch, seed=0)
    times = []
    for _ in range(args.steps):
        batch = next(loader)
        t0 = time.perf_counter()
        loss = model(**batch, return_logits=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    tokens = args.micro_batch * task.seq_len
    return tokens / statistics.median(times[args.warmup:])


def seedline_perf(data: str, workers: int, args, use_gpu: bool) -> dict[str, float]:
    """Run the pretrain stage for ``args.steps`` steps; median tokens/s (and MFU when known)."""
    from pipeline.stage import Progress, StageContext, handle
    from pipeline.tracking import NullTracker
    from stages.pretrain.config import PretrainConfig
    from stages.pretrain.run import run

    cfg = PretrainConfig(
        model={"preset": args.preset}, log_every=10**6,
        train={"steps": args.steps, "micro_batch": args.micro_batch, "warmup": 1, "lr": 3e-4, "min_lr": 3e-5},
        scaling={"num_workers": workers, "cpus_per_worker": 1, "use_gpu": use_gpu},
        deepspeed={"zero_stage": 2}, checkpoint={"every": 10**6, "keep": 1}, eval={"every": 0, "batches": 1})
    with tempfile.TemporaryDirectory(prefix="seedline-bench-") as tmp:
        ctx = StageContext(name="pretrain", out_dir=str(Path(tmp) / "pretrain"), run_dir=tmp,
                           fingerprint="bench",
                           inputs={"data": [handle("tokenize", data, "shards", fingerprint="bench")]},
                           tracker=NullTracker(), progress=Progress(None), logger=logging.getLogger("bench"),
                           ray_num_cpus=max(2, workers))
        run(cfg, ctx)
        perf = [json.loads(ln) for ln in (Path(tmp) / "pretrain" / "perf.jsonl").read_text().splitlines()]
    timed = perf[args.warmup:]
    out = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed)}
    if all("mfu" in r for r in timed):
        out["mfu"] = statistics.median(r["mfu"] for r in timed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    import torch

    from stages.lm.presets import ModelSpec
    from stages.pretrain.task import PretrainTask

    data = args.data or default_data()
    use_gpu = torch.cuda.is_available()
    task = PretrainTask(data, ModelSpec(preset=args.preset))
    shape = (f"preset {args.preset} ({sum(p.numel() for p in task.build_model().parameters()) / 1e6:.2f}M "
             f"params), seq {task.seq_len}, micro-batch {args.micro_batch}/worker, {args.steps} steps "
             f"(median after {args.warmup})")
    print(f"data: {data}")
    print(f"shape: {shape}")
    device = torch.cuda.get_device_name() if use_gpu else f"CPU ({os.cpu_count()} cores), 1 thread/worker"
    print(f"device: {device}")
    base = None
    if not use_gpu:
        base = anchor_tokens_per_s(task, args)
        print(f"anchor plain PyTorch loop, 1 process: {base:,.0f} tokens/s")
    results = {}
    for w in (int(x) for x in args.workers.split(",")):
        r = seedline_perf(data, w, args, use_gpu)
        results[w] = r["tokens_per_s"]
        mfu = f", MFU {r['mfu'] * 100:.1f}%" if "mfu" in r else ", MFU n/a (no peak for this device)"
        vs = f", {r['tokens_per_s'] / base:.2f}x the anchor" if base else ""
        print(f"seedline ZeRO-2, {w} worker(s): {r['tokens_per_s']:,.0f} tokens/s{mfu}{vs}")
    if 1 in results and 2 in results:
        print(f"scaling 2 workers / 1 worker: {results[2] / results[1]:.2f}x")


if __name__ == "__main__":
    main()
