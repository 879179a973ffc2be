"""The dpo stage: data step, reference pass, training on the shared trainer, held-out comparison.

Steps, each resumable (a killed run redoes only what has no marker, to the same bytes):

1. data (``stages.dpo.prepare``): tokenized pairs, quarantined records, counts;
2. reference pass (``stages.dpo.reference``): the sft model's summed log-probs of every pair, on one Ray
   worker. With ``reference: in_memory`` only the held-out split is scored here (for the baseline below)
   and training keeps a frozen reference model instead;
3. training (``stages.lm.trainer.fit``): checkpoints, resume, metrics, ``<out>/model/``;
4. the trained policy scores the held-out pairs.

The baseline the demo is judged against: ``base_eval_logp_accuracy``, the share of held-out pairs that
the sft model already prefers (logp_chosen > logp_rejected). Next to it, training reports
``eval_rewards/accuracies`` (pairs whose implicit reward margin is positive) and step 4 adds
``final_eval_logp_accuracy`` (the trained policy's own preference). All go to MLflow and ``stats.json``.
"""

from __future__ import annotations

import numpy as np

from pipeline import storage
from pipeline.errors import SeedlineError
from pipeline.stage import StageContext
from stages.dpo.config import DPOConfig
from stages.dpo.prepare import DataSpec, prepare, prepared
from stages.dpo.reference import ReferenceJob, load_reference, run_jobs
from stages.lm.trainer import FitResult


def model_source(config: DPOConfig, ctx: StageContext) -> tuple[str, str]:
    """(model directory the policy and reference start from, tokenizer directory)."""
    if config.init_from:
        model_dir = config.init_from
    elif "sft" in ctx.upstream:
        model_dir = storage.join(ctx.upstream["sft"].out_dir, "model")
    else:
        raise SeedlineError("dpo: no model to start from: add an sft stage or set stages.dpo.init_from")
    if not storage.exists(storage.join(model_dir, "config.json")):
        raise SeedlineError(f"dpo: {model_dir} is not a Hugging Face model directory (no config.json)")
    if storage.exists(storage.join(model_dir, "tokenizer.json")):
        return model_dir, model_dir
    if "tokenize" in ctx.upstream:
        tok_dir = storage.join(ctx.upstream["tokenize"].out_dir, "tokenizer")
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
    n_train, n_val, workers = summary["train"]["pairs"], summary["val"]["pairs"], config.scaling.num_workers
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
    """Summed completion log-probs of ``splits`` under ``model_dir`` into ``<out>/<dest>/<split>``."""
    jobs = [ReferenceJob(model_dir, ctx.path("pairs", f"{s}.arrow"), ctx.path(dest, s), config.max_len,
                         pad_id, batch_size=config.train.micro_batch, use_gpu=config.scaling.use_gpu)
            for s in splits]
    n = {s: prepared(ctx.out_dir)[s]["pairs"] for s in splits}
    if all(not j.pending(n[s]) for j, s in zip(jobs, splits, strict=True)):
        return
    ctx.init_ray()
    run_jobs(jobs, ctx.progress, on_ray=True, num_cpus=config.scaling.cpus_per_worker)


def preference_accuracy(logps: np.ndarray) -> float:
    """Share of pairs with logp(chosen) > logp(rejected): a model's own (implicit) preference."""
    return float(np.mean(logps[:, 0] > logps[:, 1])) if len(logps) else float("nan")


def run(config: DPOConfig, ctx: StageContext) -> FitResult:
    """Prepare pairs, score them with the reference, train with DPO, compare on held-out pairs."""
    from stages.dpo.task import DPOTask
    from stages.lm.trainer import fit

    model_dir, tokenizer_dir = model_source(config, ctx)
    tokenizer_json = storage.read_text(storage.join(tokenizer_dir, "tokenizer.json"))
    pad_id = _pad_id(tokenizer_json)
    summary = _data_step(config, ctx, tokenizer_json)

    splits = ["train", "val"] if config.reference == "precompute" else ["val"]
    _score(config, ctx, model_dir, pad_id, splits, "reference")
    base = {"base_eval_logp_accuracy":
            preference_accuracy(load_reference(ctx.path("reference", "val"), summary["val"]["pairs"]))}
    ctx.tracker.log_metrics(base, step=0)
    ctx.logger.info("dpo: the sft model prefers the chosen answer on %.1f%% of held-out pairs",
                    100 * base["base_eval_logp_accuracy"])

    task = DPOTask(model_dir, tokenizer_dir, ctx.out_dir, config.max_len, pad_id, config.beta,
                   config.loss_type, config.label_smoothing, config.reference)
    result = fit(task, config, ctx)

    _score(config, ctx, result.model_dir, pad_id, ["val"], "policy_logps")
    final = {"final_eval_logp_accuracy":
             preference_accuracy(load_reference(ctx.path("policy_logps", "val"), summary["val"]["pairs"]))}
    ctx.tracker.log_metrics(final, step=result.steps)
    stats = {"data": summary, "steps": result.steps, "metrics": result.metrics, **base, **final}
    storage.write_json(ctx.path("stats.json"), stats)
    ctx.logger.info("dpo: %d steps; held-out rewards/accuracies %.3f (sft model's own preference accuracy "
                    "%.3f, after dpo %.3f)", result.steps,
                    result.metrics.get("eval_rewards/accuracies", float("nan")),
                    base["base_eval_logp_accuracy"], final["final_eval_logp_accuracy"])
    return result
