"""The shared trainer: pretrain, sft and dpo differ only in their ``TrainTask`` (data and loss).

``fit(task, cfg, ctx)`` runs a Ray Train V2 ``TorchTrainer``: ``cfg.scaling.num_workers`` workers, each
running ``stages.lm.train_worker.train_loop`` (DeepSpeed ZeRO engine, checkpoints, resume, metrics,
export). The driver only starts the workers and reads what they wrote:

- ``<out>/checkpoints/step-<N>/``: DeepSpeed checkpoints with the trainer's client state and RNG states,
  ``complete.json`` last (``stages/lm/checkpoint.py``); the newest complete one is resumed from, by a
  re-run of the stage or by Ray Train after a worker dies (``FailureConfig(max_failures)``);
- ``<out>/metrics.jsonl`` (deterministic values) and ``<out>/perf.jsonl`` (timing), see
  ``stages/lm/train_metrics.py``; the same metrics go to the stage's MLflow run from rank 0;
- ``<out>/model/``: the final weights as a ``LlamaForCausalLM`` directory (``stages.lm.hf.export_hf``).

The stage's ``health:`` section is acted on while it trains: loss spikes by every worker
(``stages/lm/health_guard.py``: warn, skip the batch, roll back to the newest checkpoint, or fail) and
stalls by a driver-side watchdog over the workers' heartbeats (``stages/lm/watchdog.py``). Fault hooks for
the tests are in ``stages/lm/faults.py``.

The stage directory may be a local (or shared) path or an object-store URL (``s3://...``): see
``stages/lm/ckpt_store.py`` for how checkpoints, metrics and the model reach an object store, and
``stages/lm/shard_cache.py`` for how the workers read tokenized shards from one. ``FitResult.io`` has the
bytes moved to and from the object store.
"""

from __future__ import annotations

import contextlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import storage
from pipeline.errors import SeedlineError
from pipeline.stage import StageContext
from stages.lm import faults
from stages.lm.lora_config import LoraSpec
from stages.lm.model_card import card_info, write_model_card
from stages.lm.train_config import TrainingStageConfig
from stages.lm.train_worker import ERROR_FILE, RESULT_FILE, train_loop


class TrainTask(ABC):
    """What a training stage supplies to ``fit``. Subclasses must be picklable (plain attributes: configs,
    paths); every method runs inside the Ray Train workers."""

    tokenizer_dir: str  # copied into model/ by export_hf at the end

    @abstractmethod
    def build_model(self):
        """The ``CausalLM`` to train (called with the same torch seed on every rank)."""

    @abstractmethod
    def train_loader(self, rank: int, world_size: int, micro_batch: int, seed: int, accum: int = 1):
        """Endless iterator of batch dicts for this rank, with ``state_dict()`` / ``load_state_dict()``
        for exact resume at any world size; an epoch ends only between optimizer steps of ``accum``
        micro-batches (so the steps see the same rows whatever the split of a step over workers). A loader
        may have ``metrics()``: counters logged with every step (a mixture's tokens per source)."""

    @abstractmethod
    def val_batches(self, rank: int, world_size: int, micro_batch: int, limit: int) -> Iterable[dict]:
        """Validation batches, deterministic, at most ``limit``, and the same count on every rank (ZeRO-3
        gathers parameters collectively in every forward)."""

    @abstractmethod
    def loss(self, model, batch: dict):
        """(scalar loss to backprop, extra scalar metrics by name); ``model`` is the DeepSpeed engine
        (call it like the ``CausalLM``: ``model(**batch)``)."""

    def tokens(self, batch: dict) -> int:
        """Tokens processed in ``batch`` (for tokens/s and MFU)."""
        return int(batch["input_ids"].numel())


@dataclass
class FitResult:
    """What ``fit`` produced: optimizer steps done, the last value of every metric, the exported model
    directory and the checkpoint directory."""

    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    model_dir: str = ""
    checkpoint_dir: str = ""
    io: dict[str, int] = field(default_factory=dict)  # bytes_uploaded / bytes_downloaded (object store)
    params: dict[str, float] = field(default_factory=dict)  # trainable_params, total_params, trainable_share
    peak_memory_mb: float | None = None  # busiest rank: GPU allocated memory, or peak RSS on CPU
    adapter_dir: str = ""  # LoRA: the adapter in PEFT's format


def final_metrics(metrics_path: Path | str) -> dict[str, float]:
    """The last value of every metric in ``metrics.jsonl`` (a local path or a URL)."""
    out: dict[str, float] = {}
    try:
        text = storage.read_text(str(metrics_path))
    except (FileNotFoundError, IsADirectoryError):
        return out
    for line in text.splitlines():
        row = json.loads(line) if line else {}
        if "event" not in row:  # health events are not metrics
            out |= {k: v for k, v in row.items() if k != "step"}
    return out


def _peak_flops(scaling) -> float | None:
    """Per-device peak FLOP/s: the configured one, else the table's entry for the local GPU."""
    if scaling.peak_flops:
        return scaling.peak_flops
    if not scaling.use_gpu:
        return None
    try:
        import torch

        if torch.cuda.is_available():
            from stages.lm.flops import peak_flops

            return peak_flops(torch.cuda.get_device_name())
    except ImportError:
        return None
    return None


# Ray Train V2 settings, read from the driver's environment when a run starts and passed on to its
# controller and workers (unless the user set them). The controller polls the workers every 2 s by
# default: each run then ends up to 2 s after its workers did, and a failure is seen that late. An
# elastic group asks for its maximum size first; right after a node is lost Ray may still count the dead
# node, and the start then waits the whole start timeout (60 s) before it is retried with the workers
# that exist: 20 s is ample for actors on running nodes (retries are unlimited).
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
RAY_TRAIN_ELASTIC_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}


@contextlib.contextmanager
def ray_train_env(elastic: bool) -> Iterator[None]:
    """Seedline's defaults for Ray Train's settings (``RAY_TRAIN_ENV``) while a run starts."""
    wanted = RAY_TRAIN_ENV | (RAY_TRAIN_ELASTIC_ENV if elastic else {})
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def fit(task: TrainTask, cfg: TrainingStageConfig, ctx: StageContext,
        lora: LoraSpec | None = None, baseline: str | None = None) -> FitResult:
    """Train ``task`` with the stage's training sections, resuming from ``<ctx.out_dir>/checkpoints``;
    with ``lora`` (the sft/dpo stage's own section) only low-rank adapters train. With ``baseline`` (a file
    name) the workers first evaluate the starting model and write ``base_eval_*`` there (the validation
    curve's step 0), in the same processes as training. See the module docstring."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    remote = storage.is_url(ctx.out_dir)
    out: Path | str = ctx.out_dir.rstrip("/") if remote else Path(ctx.out_dir).resolve()
    storage.makedirs(str(out))
    for name in (ERROR_FILE, RESULT_FILE):
        storage.remove(storage.join(str(out), name))
    hooks = faults.from_env()
    faults.arm_driver(hooks, storage.join(str(out), "checkpoints"))
    ctx.init_ray()
    from pipeline.health import HealthRules
    from stages.lm.watchdog import Heartbeats, StallWatch

    ctx.progress.set_rules(HealthRules(**cfg.health.rules()))
    # On the driver's node: an actor placed on a worker node dies with it, and the restarted group would
    # then fail on every heartbeat (node loss with no replacement).
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    heartbeats = Heartbeats.options(scheduling_strategy=here).remote()
    ray_dir = _driver_dir(str(out)) / "ray" if remote else Path(out) / "ray"
    sc = cfg.scaling
    lora_base = _lora_base(task, lora, str(out), ctx.name)
    loop_config = {
        "name": ctx.name, "task": task, "train": cfg.train, "scaling": sc, "deepspeed": cfg.deepspeed,
        "checkpoint": cfg.checkpoint, "eval": cfg.eval, "log_every": cfg.log_every, "health": cfg.health,
        "out_dir": str(out), "tracker_spec": ctx.tracker.spec(), "progress": ctx.progress, "hooks": hooks,
        "peak_flops": _peak_flops(sc), "heartbeats": heartbeats, "lora": lora, "lora_base": lora_base,
        "baseline": baseline,
    }
    resources = {"CPU": sc.cpus_per_worker} | ({"GPU": 1} if sc.use_gpu else {}) | sc.resources
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=sc.ray_num_workers(), use_gpu=sc.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=f"train-{ctx.name}", storage_path=str(ray_dir),
                                       failure_config=ray.train.FailureConfig(max_failures=sc.max_failures)),
    )
    workers = (str(sc.max_workers) if sc.min_workers == sc.max_workers
               else f"{sc.min_workers}-{sc.max_workers} (elastic)")
    ctx.logger.info("%s: training %d steps on %s worker(s), ZeRO-%d", ctx.name, cfg.train.steps, workers,
                    cfg.deepspeed.zero_stage)
    watch = StallWatch(heartbeats, cfg.health, ctx.name, ctx.tracker, ctx.logger)
    try:
        with ray_train_env(elastic=sc.min_workers != sc.max_workers):
            trainer.fit()
    except Exception as e:
        raise SeedlineError(f"{ctx.name}: training failed: {e}") from e
    finally:
        watch.stop()
        ray.kill(heartbeats)
    err = storage.read_json_or(storage.join(str(out), ERROR_FILE), None)
    if err is not None:
        raise SeedlineError(f"{ctx.name}: {err['message']}")
    result = storage.read_json_or(storage.join(str(out), RESULT_FILE), None)
    if result is None:
        raise SeedlineError(f"{ctx.name}: the workers finished without writing {RESULT_FILE}")
    metrics = final_metrics(storage.join(str(out), "metrics.jsonl"))
    model_dir = storage.join(str(out), "model")
    info = card_info(ctx, cfg, result["steps"], result.get("tokens", 0), metrics)
    if remote:
        _remote_model_card(model_dir, info)
    else:
        write_model_card(model_dir, info)
    io = {k: int(v) for k, v in result.get("io", {}).items()}
    ctx.tracker.log_metrics({f"final_{k}": v for k, v in metrics.items()}, step=result["steps"])
    if remote:
        ctx.tracker.log_metrics({f"io/{k}": float(v) for k, v in io.items()}, step=result["steps"])
    return FitResult(steps=result["steps"], metrics=metrics, model_dir=model_dir,
                     checkpoint_dir=storage.join(str(out), "checkpoints"), io=io,
                     params=result.get("params", {}), peak_memory_mb=result.get("peak_memory_mb"),
                     adapter_dir=storage.join(str(out), "adapter") if lora is not None else "")


def lora_stats(lora: LoraSpec | None, result: FitResult) -> dict[str, dict]:
    """What a LoRA run adds to its stage's ``stats.json`` (nothing without ``lora``): the trainable and
    total parameters, the trainable share, the peak memory and where the adapter is."""
    if lora is None:
        return {}
    return {"lora": {**result.params, "peak_memory_mb": result.peak_memory_mb,
                     "adapter_dir": result.adapter_dir}}


def _lora_base(task: TrainTask, lora, out: str, name: str) -> str | None:
    """With LoRA: the fingerprint of the base model (``task.model_dir``) the adapters train on; refuses
    to resume checkpoints trained on another base (they hold the adapters only)."""
    if lora is None:
        return None
    from stages.lm.lora import base_fingerprint, resume_base_mismatch

    fingerprint = base_fingerprint(task.model_dir)
    stale = resume_base_mismatch(storage.join(out, "checkpoints"), fingerprint)
    if stale is not None:
        raise SeedlineError(f"{name}: the LoRA checkpoint {stale} was trained on another base model than "
                            f"{task.model_dir}; delete {storage.join(out, 'checkpoints')} to start over")
    return fingerprint


def _driver_dir(out_url: str) -> Path:
    """The driver's node-local directory for a stage on an object store (Ray Train's own run state)."""
    from stages.lm.node_cache import cache_root, key_of

    d = cache_root() / "driver" / key_of(out_url)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _remote_model_card(model_dir: str, info) -> None:
    """The model card of an object-store model: written on a local copy of the model, then uploaded (it
    names the model's URL, not the copy)."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="seedline-card-") as tmp:
        local = Path(tmp) / "model"
        for name in storage.listdir(model_dir):
            if name.endswith(".json"):  # the card reads the configs and the weights' headers only
                (local / name).parent.mkdir(parents=True, exist_ok=True)
                (local / name).write_bytes(storage.read_bytes(storage.join(model_dir, name)))
        for name in storage.listdir(model_dir):
            if name.endswith(".safetensors"):
                with storage.open_read(storage.join(model_dir, name)) as src, open(local / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        card = write_model_card(str(local), info)
        text = Path(card).read_text().replace(str(local.resolve()), model_dir)
        storage.write_text(storage.join(model_dir, Path(card).name), text)
