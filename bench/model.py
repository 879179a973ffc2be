"""Benchmark: Seedline's ``CausalLM`` against ``transformers.LlamaForCausalLM`` (SDPA attention).

    .venv/bin/python bench/model.py [--models tiny,small] [--batch 8] [--seq 256] [--rounds 3] [--compile]

Models (vocabulary 8192 each): ``tiny``, the CPU demo preset (dim 128, 4 layers, 4/2 heads, ffn 384, tied
embeddings), and ``small`` (dim 256, 4 layers, 8/2 heads, ffn 704, untied). For each, both
implementations get the same shape, batch, sequence length, dtype, thread count and optimizer (AdamW,
torch defaults), and train on the same random tokens, each through its own training API: Seedline
gets pre-aligned labels and ``return_logits=False`` (a loss-only step), HF shifts the labels itself.
Each measurement runs in a fresh subprocess of this script, so peak memory is honest: the max RSS of the
process (``getrusage``) minus its RSS right before the model was built. Rounds alternate which model
goes first; every round does warmup steps, then times each training step (forward + backward + AdamW
step). Throughput is reported from the median step (and the best step, less sensitive to other load
on the machine), and the Seedline / HF ratio of each.

``--compile`` also times Seedline under ``torch.compile`` (an option users can turn off; HF stays
eager either way). With a CUDA device the script also prints the MFU of the ~1B preset at sequence
length 2048 in bfloat16; without one it says so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


VOCAB = 8192
MODELS = {  # name -> (preset, overrides)
    "tiny": ("tiny", {}),
    "small": ("tiny", {"dim": 256, "n_heads": 8, "n_kv_heads": 2, "ffn_dim": 704, "tie_embeddings": False}),
}


def bench_config(name: str, max_seq_len: int):
    from stages.lm.presets import resolve_model_config

    preset, overrides = MODELS[name]
    return resolve_model_config(preset, overrides, vocab_size=VOCAB, max_seq_len=max_seq_len)


def build(impl: str, cfg, device: str):
    """The model to time: 'seedline', 'seedline-compiled' or 'hf'."""
    import torch

    from stages.lm.hf import hf_config
    from stages.lm.model import CausalLM

    if impl == "hf":
        import transformers

        hf = hf_config(cfg, torch.float32, {})
        fields = {k: v for k, v in hf.items() if k not in ("architectures", "model_type", "torch_dtype")}
        return transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(**fields),
                                                           attn_implementation="sdpa").to(device)
    model = CausalLM(cfg).to(device)
    return torch.compile(model) if impl == "seedline-compiled" else model


def worker(args: argparse.Namespace) -> None:
    """Train one model for warmup + timed steps; print one JSON line with step times and memory."""
    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = bench_config(args.model, args.seq)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    base_rss = rss_bytes()
    model = build(args.worker, cfg, "cpu").to(dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        t0 = time.perf_counter()
        # Each model's own API for a training step: Seedline takes aligned targets and is told that
        # only the loss is needed (no (B, T, V) logits); HF shifts labels itself and returns logits.
        if args.worker == "hf":
            loss = model(input_ids=ids, labels=targets).loss
        else:
            loss = model(input_ids=ids, labels=targets, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": args.worker, "times": times, "mem": peak - base_rss}))


def run_worker(impl: str, model: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--model", model]
    for k in ("batch", "seq", "steps", "warmup", "threads", "dtype"):
        cmd += [f"--{k}", str(getattr(args, k))]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if res.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def gpu_mfu(args: argparse.Namespace) -> None:
    """Time the ~1B preset at seq 2048 in bfloat16 on the GPU and print tokens/s and MFU."""
    import torch

    from stages.lm.flops import flops_per_token, mfu, peak_flops
    from stages.lm.model import CausalLM
    from stages.lm.presets import resolve_model_config

    if not torch.cuda.is_available():
        print("MFU (1b preset, seq 2048, bf16): no GPU present on this machine; skipped")
        return
    name = torch.cuda.get_device_name()
    cfg = resolve_model_config("1b", {}, vocab_size=32000, max_seq_len=2048)
    torch.manual_seed(0)
    model = CausalLM(cfg).cuda().train()
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (args.gpu_batch, 2048), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.gpu_steps):
        step()
    torch.cuda.synchronize()
    tps = args.gpu_batch * 2048 * args.gpu_steps / (time.perf_counter() - t0)
    fpt = flops_per_token(cfg, 2048)
    peak = peak_flops(name)
    shown = f"{mfu(tps, fpt, peak):.1%}" if peak else "unknown peak for this device"
    print(f"MFU (1b preset, seq 2048, bf16 autocast, batch {args.gpu_batch}) on {name}: "
          f"{tps:,.0f} tokens/s, {fpt / 1e9:.2f} GFLOPs/token, MFU {shown}, "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def compare(model: str, impls: list[str], args: argparse.Namespace) -> None:
    """Run every implementation ``rounds`` times (alternating who goes first) and print the ratios."""
    cfg = bench_config(model, args.seq)
    print(f"\nmodel {model}: vocab {cfg.vocab_size}, dim {cfg.dim}, layers {cfg.n_layers}, heads "
          f"{cfg.n_heads}/{cfg.kv_heads} kv, ffn {cfg.hidden_dim}, tied {cfg.tie_embeddings}")
    times: dict[str, list[float]] = {k: [] for k in impls}
    mem: dict[str, list[int]] = {k: [] for k in impls}
    for r in range(args.rounds):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            res = run_worker(impl, model, args)
            times[impl] += res["times"]
            mem[impl].append(res["mem"])
    tokens = args.batch * args.seq
    stats = {k: (tokens / statistics.median(v), tokens / min(v), max(mem[k]) / 2**20)
             for k, v in times.items()}
    for impl, (med, best, mib) in stats.items():
        print(f"  {impl:18s} tokens/s median {med:8.0f}  best {best:8.0f}  "
              f"peak memory (RSS delta) {mib:7.1f} MiB")
    hf_med, hf_best, hf_mem = stats["hf"]
    for impl in (k for k in impls if k != "hf"):
        med, best, mib = stats[impl]
        print(f"  ratio {impl}/hf: tokens/s median {med / hf_med:.2f}x, best {best / hf_best:.2f}x; "
              f"memory {mib / hf_mem:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--models", default="tiny,small", help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help="also time Seedline under torch.compile")
    ap.add_argument("--gpu-batch", type=int, default=4)
    ap.add_argument("--gpu-steps", type=int, default=10)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    impls = ["seedline", "hf"] + (["seedline-compiled"] if args.compile else [])
    print(f"batch {args.batch} x seq {args.seq}, {args.dtype}, {args.threads} threads; {args.rounds} rounds "
          f"x ({args.warmup} warmup + {args.steps} timed steps), each run in a fresh process")
    for model in args.models.split(","):
        compare(model, impls, args)
    gpu_mfu(args)


if __name__ == "__main__":
    main()
