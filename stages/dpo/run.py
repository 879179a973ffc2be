"""The dpo stage: data step, reference pass, training on the shared trainer, held-out comparison.

Steps, each resumable (a killed run redoes only what has no marker, to the same bytes):

1. data (``stages.dpo.prepare``): tokenized pairs, quarantined records, counts;
2. reference pass (``stages.dpo.reference``): the sft model's summed log-probs of every pair, on one Ray
   worker. With ``reference: in_memory`` only the held-out split is scored here (for the baseline below)
   and training keeps a frozen reference model instead;
3. training (``stages.lm.trainer.fit``): checkpoints, resume, metrics (``eval_rewards/accuracies`` etc.
   on ``eval.batches`` micro-batches per worker), ``<out>/model/``;
4. the trained policy scores every held-out pair (``policy_logps/val``).

Held-out comparison, on the same (all) held-out pairs, to MLflow and ``stats.json``:

- ``base_eval_logp_accuracy``: share of pairs the sft model already prefers (logp_chosen > logp_rejected);
- ``heldout_rewards/accuracies`` (and the other TRL metrics and the loss, ``heldout_`` prefixed): the
  trained policy against the reference, exactly as in training;
- ``heldout_logp_accuracy``: share of pairs the trained policy itself prefers.
"""

from __future__ import annotations

import numpy as np

from pipeline import storage
from pipeline.errors import SeedlineError
from pipeline.stage import StageContext
from stages.dpo.config import DPOConfig
from stages.dpo.prepare import DataSpec, prepare, prepared
from stages.dpo.reference import ReferenceJob, load_reference, run_jobs
from stages.lm.lora_config import check_lora_model
from stages.lm.trainer import FitResult, lora_stats


def model_source(config: DPOConfig, ctx: StageContext) -> tuple[str, str]:
    """(model directory the policy and reference start from, tokenizer directory)."""
    model = ctx.input("model")
    if model is not None:
        model_dir = model.path
    elif config.init_from:
        model_dir = config.init_from
    else:
        raise SeedlineError("dpo: no model to start from: add an sft stage or set stages.dpo.init_from")
    if not storage.exists(storage.join(model_dir, "config.json")):
        raise SeedlineError(f"dpo: {model_dir} is not a Hugging Face model directory (no config.json)")
    if storage.exists(storage.join(model_dir, "tokenizer.json")):
        return model_dir, model_dir
    tokenizer = ctx.input("tokenizer")
    if tokenizer is not None:
        tok_dir = tokenizer.path
        if storage.exists(storage.join(tok_dir, "tokenizer.json")):
            return model_dir, tok_dir
    raise SeedlineError(f"dpo: no tokenizer.json in {model_dir} (and no tokenize stage to take one from)")


def _pad_id(tokenizer_json: str) -> int:
    from tokenizers import Tokenizer

    from stages.tokenize.config import EOT, PAD

    tok = Tokenizer.from_str(tokenizer_json)
    for t in (PAD, EOT):
        if tok.token_to_id(t) is not None:
            return int(tok.token_to_id(t))
    return 0  # padding is never attended to nor scored; any id works


def _data_step(config: DPOConfig, ctx: StageContext, tokenizer_json: str) -> dict:
    summary = prepared(ctx.out_dir)
    if summary is None:
        ctx.progress.update(phase="data", force=True)
        spec = DataSpec(config.data, config.val, config.val_fraction, config.max_len, config.max_prompt_len)
        summary = prepare(spec, tokenizer_json, ctx.out_dir)
    n_train, n_val, workers = summary["train"]["pairs"], summary["val"]["pairs"], config.scaling.max_workers
    ctx.logger.info("dpo: %d training pairs, %d held out, %d quarantined (see rejects/)", n_train, n_val,
                    summary["train"]["quarantined"] + summary["val"]["quarantined"])
    if n_train < config.train.micro_batch * workers:
        raise SeedlineError(f"dpo: {n_train} training pairs, fewer than one global batch (train.micro_batch "
                            f"x scaling.num_workers = {config.train.micro_batch * workers})")
    if n_val < workers:
        raise SeedlineError(f"dpo: {n_val} held-out pairs, need at least one per worker ({workers}); set "
                            "stages.dpo.val or raise val_fraction")
    return summary


def _score(config: DPOConfig, ctx: StageContext, model_dir: str, pad_id: int, splits: list[str],
           dest: str) -> None:
    """Summed completion log-probs of ``splits`` under ``model_dir`` into ``<out>/<dest>/<split>``, on
    as many Ray tasks as there are training workers."""
    jobs = [ReferenceJob(model_dir, ctx.path("pairs", f"{s}.arrow"), ctx.path(dest, s), config.max_len,
                         pad_id, batch_size=config.train.micro_batch, use_gpu=config.scaling.use_gpu)
            for s in splits]
    n = {s: prepared(ctx.out_dir)[s]["pairs"] for s in splits}
    if all(not j.pending(n[s]) for j, s in zip(jobs, splits, strict=True)):
        return
    ctx.init_ray()
    ctx.progress.update(phase=dest, force=True)
    run_jobs(jobs, config.scaling.max_workers, config.scaling.cpus_per_worker)


def preference_accuracy(logps: np.ndarray) -> float:
    """Share of pairs with logp(chosen) > logp(rejected): a model's own (implicit) preference."""
    return float(np.mean(logps[:, 0] > logps[:, 1])) if len(logps) else float("nan")


def heldout_metrics(config: DPOConfig, policy: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """DPO loss and TRL metrics of the trained policy over every held-out pair, and its own preference."""
    import torch

    from stages.dpo.loss import dpo_loss

    pc, pr, rc, rr = (torch.from_numpy(a[:, i].copy()) for a in (policy, ref) for i in (0, 1))
    loss, metrics = dpo_loss(pc, pr, rc, rr, config.beta, config.loss_type, config.label_smoothing)
    return {"heldout_loss": float(loss), **{f"heldout_{k}": float(v) for k, v in metrics.items()},
            "heldout_logp_accuracy": preference_accuracy(policy)}


def run(config: DPOConfig, ctx: StageContext) -> FitResult:
    """Prepare pairs, score them with the reference, train with DPO, compare on held-out pairs."""
    from stages.dpo.task import DPOTask
    from stages.lm.trainer import fit

    model_dir, tokenizer_dir = model_source(config, ctx)
    check_lora_model(config.lora, model_dir, "dpo")
    tokenizer_json = storage.read_text(storage.join(tokenizer_dir, "tokenizer.json"))
    pad_id = _pad_id(tokenizer_json)
    summary = _data_step(config, ctx, tokenizer_json)

    splits = ["train", "val"] if config.reference == "precompute" else ["val"]
    _score(config, ctx, model_dir, pad_id, splits, "reference")
    n_val = summary["val"]["pairs"]
    ref_val = load_reference(ctx.path("reference", "val"), n_val)
    base = {"base_eval_logp_accuracy": preference_accuracy(ref_val)}
    quarantined = summary["train"]["quarantined"] + summary["val"]["quarantined"]
    ctx.tracker.log_metrics({**base, "data_train_pairs": summary["train"]["pairs"], "data_val_pairs": n_val,
                             "data_quarantined": quarantined}, step=0)
    ctx.logger.info("dpo: the sft model prefers the chosen answer on %.1f%% of held-out pairs",
                    100 * base["base_eval_logp_accuracy"])

    task = DPOTask(model_dir, tokenizer_dir, ctx.out_dir, config.max_len, pad_id, config.beta,
                   config.loss_type, config.label_smoothing, config.reference, lora=config.lora is not None)
    result = fit(task, config, ctx, lora=config.lora)

    _score(config, ctx, result.model_dir, pad_id, ["val"], "policy_logps")
    heldout = heldout_metrics(config, load_reference(ctx.path("policy_logps", "val"), n_val), ref_val)
    ctx.tracker.log_metrics(base | heldout, step=result.steps)
    stats = {"data": summary, "steps": result.steps, "metrics": result.metrics, "heldout_pairs": n_val,
             "io": result.io, **base, **heldout, **lora_stats(config.lora, result)}
    storage.write_json(ctx.path("stats.json"), stats)
    ctx.logger.info("dpo: %d steps; on %d held-out pairs: rewards/accuracies %.3f, the sft model's own "
                    "preference accuracy %.3f (the trained policy's %.3f)", result.steps, n_val,
                    heldout["heldout_rewards/accuracies"], base["base_eval_logp_accuracy"],
                    heldout["heldout_logp_accuracy"])
    return result
