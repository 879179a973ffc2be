"""The training loop that runs inside each Ray Train worker (see ``stages/lm/trainer.py`` for the driver).

One call of ``train_loop`` = one worker-group attempt: seed, build the model, wrap it in a DeepSpeed
engine, resume from the newest complete checkpoint, then for each optimizer step run ``grad_accum``
micro-batches, validate and checkpoint on schedule, and finally export the consolidated weights.
A restarted attempt (Ray Train's ``FailureConfig``) simply calls it again and resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.lm import checkpoint as ckpt
from stages.lm import faults
from stages.lm.ckpt_store import CheckpointStore
from stages.lm.ds_config import ds_config, lr_at, lr_factor
from stages.lm.flops import flops_per_token, mfu
from stages.lm.health_guard import Diverged, SpikeGuard, config_skips, skip_steps
from stages.lm.mixture import SourceExhausted
from stages.lm.train_config import accumulation
from stages.lm.train_metrics import MetricsSink, mean_over_ranks

ERROR_FILE = "train_error.json"
RESULT_FILE = "fit_result.json"


class NonFiniteLoss(Exception):
    """A NaN/inf loss or gradient norm at ``step`` (1-based optimizer step)."""

    def __init__(self, step: int, what: str):
        super().__init__(f"non-finite {what} at step {step}; stopped before updating a checkpoint "
                         f"(newest checkpoint is unaffected). Lower train.lr or set train.nan_policy: skip")
        self.step = step


@dataclass
class WorkerEnv:
    rank: int
    world: int
    device: Any
    out: Path  # where rank 0 writes metrics: the stage directory, or a node-local staging directory
    store: CheckpointStore
    out_url: str  # the stage directory (a local path or an object-store URL)
    params: dict[str, float] = field(default_factory=dict)  # trainable/total parameter counts
    lora_base: str | None = None  # LoRA: the base model's fingerprint (checkpoints hold the adapters only)


def seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _setup(lc: dict[str, Any]) -> WorkerEnv:
    """Process-wide settings; must run before deepspeed is imported."""
    scaling = lc["scaling"]
    os.environ["DS_ACCELERATOR"] = "cuda" if scaling.use_gpu else "cpu"
    import ray.train
    import torch

    torch.set_num_threads(scaling.cpus_per_worker)
    if not scaling.use_gpu:
        torch.use_deterministic_algorithms(True)
        # ...but do not NaN-fill every torch.empty: DeepSpeed allocates large buffers that it overwrites
        # anyway, and the fill made ZeRO-2 steps ~10x slower on CPU
        torch.utils.deterministic.fill_uninitialized_memory = False
    tc = ray.train.get_context()
    if scaling.use_gpu:
        import ray.train.torch as rtt

        device = rtt.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    from pipeline.run_logs import mark_worker_logs
    from stages.lm.node_cache import reset_io

    mark_worker_logs()  # the step lines reach the driver's console; the rest goes to the stage's log
    reset_io()
    store = CheckpointStore(lc["out_dir"], tc.get_world_rank(), tc.get_local_rank())
    return WorkerEnv(tc.get_world_rank(), tc.get_world_size(), device, store.local_out, store, lc["out_dir"],
                     lora_base=lc.get("lora_base"))


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only (not norms), as is standard for LLaMA-style models."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # LoRA: no trainable norms, no empty group for ZeRO


def _engine(lc: dict[str, Any], env: WorkerEnv):
    import torch

    from stages.lm.ds_import import import_deepspeed

    deepspeed = import_deepspeed()

    train, spec, scaling = lc["train"], lc["deepspeed"], lc["scaling"]
    deepspeed.init_distributed(dist_backend="nccl" if scaling.use_gpu else "gloo")
    seed_all(train.seed)  # identical initial weights on every rank
    model = lc["task"].build_model()
    model.activation_checkpointing = spec.activation_checkpointing
    if lc.get("lora") is not None:
        from stages.lm.lora import apply_lora

        apply_lora(model, lc["lora"])  # before the per-rank seeds: the same adapters on every rank
    from stages.lm.lora import trainable_summary

    env.params = trainable_summary(model)  # before ZeRO-3 partitions the parameters
    seed_all(train.seed + 7919 * env.rank)  # per-rank streams for anything random in the task
    groups = _param_groups(model, train.weight_decay)
    config = ds_config(train, spec, env.world, scaling.use_gpu)
    kwargs: dict[str, Any] = {"model": model, "config": config}
    if "optimizer" in config:  # DeepSpeed's optimizer (GPU): it builds it from the param groups
        kwargs |= {"model_parameters": groups,
                   "lr_scheduler": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(train))}
    else:
        opt = torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, eps=train.eps)
        kwargs |= {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(train))}
    engine, *_ = deepspeed.initialize(**kwargs)
    from stages.lm.safe_load import install_safe_engine

    install_safe_engine(engine)  # DeepSpeed's .pt files are read with weights_only=True
    if spec.compile:
        engine.compile()
    return engine


def _resume(engine, loader, env: WorkerEnv) -> dict[str, Any]:
    """Load the newest complete checkpoint (if any) into the engine, loader and RNGs."""
    import torch.distributed as dist

    store = env.store
    if env.rank == 0:
        store.remove_incomplete()
    dist.barrier()
    found = store.newest()
    if found is None:
        return {"step": 0, "tokens": 0, "consumed_samples": 0, "health": None}
    if env.rank == 0:
        store.fetch_metrics()
    return _load(engine, loader, env, found)


def _load(engine, loader, env: WorkerEnv, found: tuple[int, str, dict[str, Any]]) -> dict[str, Any]:
    """Load checkpoint ``found`` (``store.newest()``) into the engine, loader and RNGs; its trainer state."""
    import torch.distributed as dist

    store = env.store
    _, name, marker = found
    root = store.fetch(name)
    path = root / name
    resharded = marker["world_size"] != env.world
    load_root = root
    if resharded and engine.zero_optimization_stage() > 0:
        from stages.lm import reshard

        # ZeRO partitions are cut for the writer's world size: load a world-size-free conversion
        load_root = reshard.universal(root, name, env.out_url)
    engine._config.load_universal_checkpoint = load_root is not root  # read by DeepSpeed at load time only
    from stages.lm.reshard import own_group_settings
    from stages.lm.safe_load import guarded

    keep = own_group_settings(engine) if load_root is not root else contextlib.nullcontext()
    with guarded(path), keep:
        # LoRA checkpoints hold the trained weights only; the frozen base comes from the base model
        loaded, _ = engine.load_checkpoint(str(load_root), tag=name, load_optimizer_states=True,
                                           load_lr_scheduler_states=True,
                                           load_module_strict=env.lora_base is None)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {store.url}/{name}")
    client = ckpt.load_trainer_state(path)
    loader.load_state_dict(client["loader"])
    if resharded:  # new ranks get fresh streams of their own; nothing in training draws from them today
        seed_all(client["step"] * 1_000_003 + 7919 * env.rank)
    else:
        ckpt.load_rng(path, env.rank)
    dist.barrier()  # every rank of this node has read the restore copy
    store.release()
    if load_root is not root:
        from stages.lm import reshard

        reshard.release(env.out_url, env.store.local_rank)
    return {**{k: client[k] for k in ("step", "tokens", "consumed_samples")}, "health": client.get("health")}


def _all_finite(value, device) -> bool:
    """Whether ``value`` is finite on every rank (one all-reduce, so all ranks decide alike)."""
    import torch
    import torch.distributed as dist

    bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def _grad_norm(engine) -> float:
    """Global gradient norm of the step just taken (ZeRO-0 does not record it: computed from the grads)."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _local_grad_norm(model) -> float:
    import torch

    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def _train_step(engine, loader, lc: dict[str, Any], env: WorkerEnv, step: int, guard: SpikeGuard
                ) -> tuple[dict[str, float], int, int]:
    """One optimizer step (1-based ``step``) of ``grad_accum`` micro-batches. Returns (metrics averaged over
    micro-batches and ranks, tokens of all ranks, the batches' sequence length)."""
    task, train = lc["task"], lc["train"]
    sums: dict[str, float] = {}
    tokens = skipped = spiked = done = 0
    gn0 = None
    while done < train.grad_accum:
        batch = _to_device(next(loader), env.device)
        faults.trace_batch(lc["hooks"], env.rank, env.world, step, loader.last_indices)
        loss, extra = task.loss(engine, batch)
        if not _all_finite(loss.detach(), env.device):
            if train.nan_policy == "stop":
                raise NonFiniteLoss(step, "loss")
            skipped += 1
            if skipped > 10 * train.grad_accum:
                raise NonFiniteLoss(step, f"loss in {skipped} consecutive micro-batches")
            continue
        if guard.action == "skip_batch" and guard.drops(mean_over_ranks({"l": float(loss.detach())},
                                                                        env.device)["l"]):
            spiked += 1  # health.on_spike: skip_batch; no backward, so no update from it
            if spiked > 10 * train.grad_accum:
                raise Diverged(step, f"the loss spiked in {spiked} consecutive micro-batches at step {step} "
                                     "(health.on_spike: skip_batch); stopped")
            continue
        engine.backward(loss)
        if done == train.grad_accum - 1 and lc["deepspeed"].zero_stage == 0:
            gn0 = _local_grad_norm(engine.module)  # grads are all-reduced at the boundary's backward
        engine.step()
        done += 1
        tokens += task.tokens(batch)
        for k, v in {"loss": loss, **extra}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    gn = gn0 if gn0 is not None else _grad_norm(engine)
    metrics = mean_over_ranks({**{k: v / train.grad_accum for k, v in sums.items()}, "~tokens": tokens},
                              env.device)
    tokens = round(metrics.pop("~tokens") * env.world)
    if not np.isfinite(gn):
        raise NonFiniteLoss(step, "gradient norm")
    metrics |= {"lr": lr_at(train, step - 1), "grad_norm": gn}
    if skipped:
        metrics["skipped_batches"] = float(skipped)
    if spiked:
        metrics["spike_skipped_batches"] = float(spiked)
    return metrics, tokens, int(batch["input_ids"].shape[1])


def _evaluate(engine, lc: dict[str, Any], env: WorkerEnv) -> dict[str, float]:
    """Mean validation loss (and extras) over ``eval.batches`` micro-batches per rank of the full world
    (``max`` workers): fewer workers each take more, so the figure stays comparable across a resize."""
    import torch

    task, ev = lc["task"], lc["eval"]
    limit = -(-ev.batches * lc["scaling"].max_workers // env.world)
    sums: dict[str, float] = {}
    n = 0
    engine.eval()
    with torch.no_grad():
        for batch in task.val_batches(env.rank, env.world, lc["train"].micro_batch, limit):
            loss, extra = task.loss(engine, _to_device(batch, env.device))
            for k, v in {"loss": loss, **extra}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
    engine.train()
    if n == 0:
        raise RuntimeError("val_batches yielded no batch")
    means = mean_over_ranks({k: v / n for k, v in sums.items()}, env.device)
    return {f"eval_{k}": v for k, v in means.items()}


def _baseline(engine, lc: dict[str, Any], env: WorkerEnv, sink) -> None:
    """The starting model's validation metrics, before the first step, on the batches every later
    evaluation uses: step 0 of the validation curve (``metrics.jsonl``, MLflow ``eval_*`` and ``base_eval_*``)
    and ``lc["baseline"]`` in the stage directory (written once: a resumed run has it)."""
    evm = _evaluate(engine, lc, env)
    if sink:
        sink.eval(0, evm)
        sink.tracker.log_metrics({f"base_{k}": v for k, v in evm.items()}, step=0)
    if env.rank == 0:
        _write_json(env, lc["baseline"], {f"base_{k}": v for k, v in evm.items()})


def _save(engine, loader, env: WorkerEnv, state: dict[str, Any], keep: int) -> None:
    """Checkpoint ``state`` (step, tokens, consumed samples, the spike guard's history) with the engine,
    the loader position and every rank's RNGs; the marker last."""
    import torch.distributed as dist

    store = env.store
    tag = f"step-{state['step']}"
    tag_dir = store.tag_dir(tag)
    lora = env.lora_base is not None
    engine.save_checkpoint(str(store.save_root), tag=tag, save_latest=False, exclude_frozen_parameters=lora)
    if env.rank == 0:
        ckpt.save_trainer_state(tag_dir, {**state, "loader": loader.state_dict()})
    ckpt.save_rng(tag_dir, env.rank)
    store.publish(tag)  # object store: this rank's files uploaded
    if env.rank == 0:
        store.upload_metrics()  # they cover this step before the marker vouches for it
    dist.barrier()  # every rank's files are in place
    if env.rank == 0:
        info = {"step": state["step"], "world_size": env.world, "tokens": state["tokens"],
                "global_batch": engine.train_batch_size()}
        store.mark(tag, info | ({"lora_base": env.lora_base} if lora else {}))
        store.prune(keep)
    dist.barrier()


def _export(engine, lc: dict[str, Any], env: WorkerEnv) -> None:
    """Consolidated weights to ``<out>/model`` (rank 0 writes; ZeRO-3 gathers the shards first)."""
    import deepspeed
    import torch.distributed as dist

    from stages.lm.hf import export_hf

    def write():
        if env.rank == 0:
            if lc.get("lora") is not None:
                from stages.lm.lora import merge_lora, save_adapter

                save_adapter(engine.module, lc["lora"], lc["task"].model_dir, str(env.out / "adapter"))
                env.store.put_dir(env.out / "adapter", "adapter")
                merge_lora(engine.module)  # model/ holds the merged weights
            export_hf(engine.module, lc["task"].tokenizer_dir, str(env.out / "model"))
            env.store.put_model(env.out / "model")

    if lc["deepspeed"].zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            write()
    else:
        write()
    dist.barrier()


def _write_json(env: WorkerEnv, name: str, obj: dict[str, Any]) -> None:
    """A result file in the stage directory (local: temp + rename, as before; URL: one upload)."""
    from pipeline import storage

    if storage.is_url(env.out_url):
        storage.write_text(storage.join(env.out_url, name), json.dumps(obj, indent=1, sort_keys=True))
        return
    path = Path(env.out_url) / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _io_totals(env: WorkerEnv) -> dict[str, int]:
    """Bytes this attempt's ranks moved to and from the object store, summed over ranks."""
    import torch
    import torch.distributed as dist

    from stages.lm.node_cache import IO

    keys = sorted(IO)
    t = torch.tensor([float(IO[k]) for k in keys], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return {k: int(v) for k, v in zip(keys, t.tolist(), strict=True)}


def _rollback(engine, loader, env: WorkerEnv, step: int, guard: SpikeGuard, sink) -> dict[str, Any]:
    """``on_spike: rollback`` at step ``step``: reload the newest complete checkpoint and go on from the data
    after ``step`` (the window since the checkpoint is skipped, as ``train.skip_data`` would)."""
    position = loader.state_dict()
    found = env.store.newest()
    if found is None:
        raise Diverged(step, f"the loss diverged at step {step} before the first checkpoint: nothing to roll "
                             "back to (lower checkpoint.every or train.lr)")
    state = _load(engine, loader, env, found)
    loader.load_state_dict(position)
    back = state["step"]
    guard.restore(state["health"])  # the spike history as of the checkpoint
    guard.rollbacks += 1
    if sink:
        sink.rewind(back)
        sink.event({"step": step, "event": "rollback", "to_step": back, "skipped": [back + 1, step],
                    "rollbacks": guard.rollbacks},
                   f"step {step}: the loss diverged; rolled back to the checkpoint of step {back} and "
                   f"skipped the data of steps {back + 1}-{step} (to reproduce from the start: "
                   f"train.skip_data: [[{back + 1}, {step}]])")
    return state


def _ran_out(engine, loader, lc: dict[str, Any], env: WorkerEnv, state: dict[str, Any], guard: SpikeGuard,
             sink, e: SourceExhausted) -> None:
    """A mixture source ran out under ``on_exhausted: stop``: the run ends after the last whole step, with
    its evaluation and checkpoint as for a last step."""
    step = state["step"]
    if sink:
        sink.event({"step": step, "event": "source_exhausted", "source": e.name, "rows": e.rows},
                   f"step {step}: {e} (after {step} of {lc['train'].steps} steps)")
    if step == 0:
        raise RuntimeError(f"{e}, before the first step") from e
    evm = _evaluate(engine, lc, env)
    if sink:
        sink.eval(step, evm)
    _save(engine, loader, env, {**state, "health": guard.state_dict()}, lc["checkpoint"].keep)


def train_loop(lc: dict[str, Any]) -> None:
    """Ray Train worker entry point; ``lc`` is built by ``trainer.fit``."""
    env = _setup(lc)
    import torch.distributed as dist

    # the global batch is fixed by the config (max workers); this attempt's world size sets the accumulation
    lc = {**lc, "train": lc["train"].model_copy(
        update={"grad_accum": accumulation(lc["train"], lc["scaling"], env.world)})}
    task, train, ev, ck = lc["task"], lc["train"], lc["eval"], lc["checkpoint"]
    engine = _engine(lc, env)
    loader = task.train_loader(env.rank, env.world, train.micro_batch, train.seed, train.grad_accum)
    state = _resume(engine, loader, env)
    guard = SpikeGuard(lc["health"], state.pop("health"))
    sink = None
    if env.rank == 0:
        sink = MetricsSink(env.out, state["step"], train.steps, lc["log_every"], lc["tracker_spec"],
                           lc["progress"], logger_name=f"seedline.{lc.get('name', 'train')}")
    if lc.get("baseline") and state["step"] == 0:
        _baseline(engine, lc, env, sink)
    beats = _heartbeats(lc, env, state["step"])
    peak = lc["peak_flops"]
    try:
        while state["step"] < train.steps:
            if state["step"] % lc["log_every"] == 0:
                _stall_events(lc, sink)  # one actor round trip per logging interval, not per step
            step = state["step"] + 1
            skip_steps(loader, config_skips(train.skip_data, step), train.grad_accum)
            t0 = time.perf_counter()
            try:
                metrics, tokens, seq_len = _train_step(engine, loader, lc, env, step, guard)
            except SourceExhausted as e:  # mixture.on_exhausted: stop; raised before the step began
                _ran_out(engine, loader, lc, env, state, guard, sink, e)
                break
            metrics |= loader.metrics() if hasattr(loader, "metrics") else {}
            dt = time.perf_counter() - t0
            state["step"] = step
            beats.advance(step, dt)
            state["tokens"] += tokens
            state["consumed_samples"] += train.micro_batch * train.grad_accum * env.world
            tps = tokens / dt
            perf = {"tokens_per_s": tps, "step_time_s": dt}
            if peak:
                perf["mfu"] = mfu(tps / env.world, flops_per_token(engine.module.cfg, seq_len), peak)
            if sink:
                sink.train_step(step, metrics, perf, state["tokens"])
            if _on_spike(guard, step, metrics["loss"], sink):
                restored = _rollback(engine, loader, env, step, guard, sink)
                state = {k: restored[k] for k in ("step", "tokens", "consumed_samples")}
                beats.advance(state["step"], dt)
                continue
            faults.after_step(lc["hooks"], env.rank, env.world, step, env.out_url)
            if (ev.every and step % ev.every == 0) or step == train.steps:
                evm = _evaluate(engine, lc, env)
                if sink:
                    sink.eval(step, evm)
            if step % ck.every == 0 or step == train.steps:
                _save(engine, loader, env, {**state, "health": guard.state_dict()}, ck.keep)
                faults.after_save(lc["hooks"], step)
    except (NonFiniteLoss, Diverged) as e:
        beats.stop()
        _stall_events(lc, sink)
        if env.rank == 0:
            _write_json(env, ERROR_FILE, {"step": e.step, "message": str(e)})
        if sink:
            sink.close()
            env.store.upload_metrics()
        dist.barrier()
        return
    beats.stop()
    _stall_events(lc, sink)
    if sink:
        sink.close()
        env.store.upload_metrics()
    _export(engine, lc, env)
    io = _io_totals(env)
    peak = _peak_memory_mb(env)
    if env.rank == 0:
        _write_json(env, RESULT_FILE, {"steps": state["step"], "tokens": state["tokens"], "io": io,
                                       "params": env.params, "peak_memory_mb": peak})


def _peak_memory_mb(env: WorkerEnv) -> float:
    """Peak memory of the busiest rank in MiB: allocated device memory on a GPU, else the process's
    peak resident set (``getrusage``; the model, gradients, optimizer state, activations and the runtime)."""
    import resource

    import torch
    import torch.distributed as dist

    if env.device.type == "cuda":
        mb = torch.cuda.max_memory_allocated(env.device) / 2**20
    else:
        mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    t = torch.tensor([mb], dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _heartbeats(lc: dict[str, Any], env: WorkerEnv, step: int):
    """This worker's heartbeat thread (``stages.lm.watchdog``)."""
    from stages.lm.watchdog import HeartbeatSender

    return HeartbeatSender(lc["heartbeats"], env.rank, step)


def _stall_events(lc: dict[str, Any], sink) -> None:
    """Rank 0: stall events the driver's watchdog reported, as ``metrics.jsonl`` lines."""
    if sink:
        import ray

        for event in ray.get(lc["heartbeats"].take_events.remote()):
            sink.note(event)


def _on_spike(guard: SpikeGuard, step: int, loss: float, sink) -> bool:
    """Judge step ``step``'s loss; log the event; raise when the stage must stop; whether to roll back."""
    event = guard.judge(step, loss)
    if event is None:
        return False
    if sink:
        what = ("the loss diverged" if event["event"] == "diverging" else "loss spike")
        sink.event(event, f"step {step}: {what}: {loss:.4f} vs running median {event['loss_median']:.4f} "
                          f"({event['spike_run']} in a row; health.on_spike: {guard.action})")
    if event["event"] != "diverging":
        return False
    stop = guard.must_stop(step)
    if stop is not None:
        raise stop
    return guard.wants_rollback()
