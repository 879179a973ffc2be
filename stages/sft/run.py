"""The sft stage: chat data -> assistant-only fine-tuning on the shared trainer. Steps (each resumable):

1. **tokenizer**: ``tokenizer/`` = the tokenize stage's tokenizer (or the model directory's) with the
   ChatML chat template sft trains with (``stages/sft/tokenizer.py``); rewritten on every run (cheap,
   deterministic).
2. **data** (``stages/sft/prepare.py``): read and quarantine records, split train/val, tokenize with the
   loss mask, apply the length policy, pack; marker ``data/prepared.json``.
3. **baseline**: the starting model's held-out loss on exactly the batches the trainer validates on,
   measured by the training workers before their first step (no process of its own); marker
   ``base_eval.json``; logged as ``base_eval_loss`` and as ``eval_loss`` at step 0 (the validation curve
   starts at the base model).
4. **train**: ``stages.lm.trainer.fit`` (checkpoints under ``checkpoints/``, resumed from the newest
   complete one; ``metrics.jsonl``; ``model/`` exported with ``tokenizer/``).
5. **finalize**: ``stats.json`` (written last: the stage is done) with the data counts, the baseline and
   final held-out losses.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline import storage
from pipeline.errors import ConfigError, SeedlineError
from pipeline.stage import StageContext
from stages.lm.lora_config import check_lora_model
from stages.sft.config import SFTConfig
from stages.sft.prepare import DataSpec, prepare
from stages.sft.task import SFTTask
from stages.sft.tokenizer import prepare_tokenizer
from stages.tokenize.config import EOT, PAD

BASELINE = "base_eval.json"


def _sources(config: SFTConfig, ctx: StageContext) -> tuple[str, str]:
    """(model directory, tokenizer source directory). The tokenizer is the tokenize stage's when the model
    is the pretrain stage's (the same files), else the one saved with the ``init_from`` model (falling back
    to the tokenize stage's when that directory has none)."""
    model, path = ctx.input("model"), None
    if model is not None:
        model_dir = model.path
    elif config.init_from:
        model_dir = path = config.init_from
    else:
        raise ConfigError("stages.sft.init_from", "required when the pipeline has no pretrain stage")
    if not storage.exists(storage.join(model_dir, "config.json")):
        raise ConfigError("stages.sft.init_from" if path else "stages.sft",
                          f"{model_dir} is not a Hugging Face model directory (no config.json)")
    own = storage.exists(storage.join(model_dir, "tokenizer.json"))
    tokenizer = ctx.input("tokenizer")
    if tokenizer is not None and not (path and own):
        return model_dir, tokenizer.path
    return model_dir, model_dir


def _check_model(model_dir: str, tok_json: str, config: SFTConfig) -> None:
    from tokenizers import Tokenizer

    hf = storage.read_json(storage.join(model_dir, "config.json"))
    vocab = Tokenizer.from_str(tok_json).get_vocab_size(with_added_tokens=True)
    if vocab > hf["vocab_size"]:
        raise ConfigError("stages.sft", f"the tokenizer has {vocab} tokens but the model in {model_dir} only "
                                        f"{hf['vocab_size']}: they do not belong together")
    limit = hf.get("max_position_embeddings")
    if limit and config.max_len > limit:
        raise ConfigError("stages.sft.max_len", f"{config.max_len} exceeds the model's context ({limit})")


def _pad_id(tok_json: str) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json)
    for t in (PAD, EOT):
        if tok.token_to_id(t) is not None:
            return int(tok.token_to_id(t))
    return 0


def _prepare_data(config: SFTConfig, tok_json: str, ctx: StageContext) -> dict[str, Any]:
    marker = ctx.path("data", "prepared.json")
    done = storage.read_json_or(marker, None)
    if done is not None:
        return done
    ctx.progress.update(step="data", force=True)
    t0 = time.monotonic()
    spec = DataSpec(config.data, config.val, config.val_fraction, config.max_len, config.packing,
                    config.truncation)
    summary = prepare(spec, tok_json, ctx.out_dir)
    ctx.logger.info("sft: data ready in %.1fs: train %d examples in %d rows (%d quarantined, %d truncated, "
                    "%d dropped), val %d examples", time.monotonic() - t0, summary["train"]["examples"],
                    summary["train"]["rows"], summary["train"]["quarantined"] + summary["val"]["quarantined"],
                    summary["train"]["truncated"],
                    summary["train"]["dropped_too_long"] + summary["train"]["dropped_no_target"],
                    summary["val"]["examples"])
    return summary


def _check_rows(config: SFTConfig, summary: dict[str, Any]) -> None:
    workers, micro = config.scaling.max_workers, config.train.micro_batch
    if summary["train"]["rows"] < workers * micro:
        raise SeedlineError(f"sft: {summary['train']['rows']} training rows, fewer than one global batch "
                            f"(train.micro_batch {micro} x scaling.num_workers {workers})")
    if summary["val"]["rows"] < workers:
        raise SeedlineError(f"sft: {summary['val']['rows']} held-out rows, fewer than the {workers} workers "
                            "that validate: set stages.sft.val or raise stages.sft.val_fraction")


def _baseline(ctx: StageContext) -> float:
    """The starting model's held-out loss, measured by the training workers before their first step."""
    loss = float(storage.read_json(ctx.path(BASELINE))["base_eval_loss"])
    ctx.logger.info("sft: held-out loss of the starting model: %.4f", loss)
    return loss


def run(config: SFTConfig, ctx: StageContext) -> dict[str, Any]:
    """Run the sft stage (see the module docstring); returns what ``stats.json`` holds."""
    from stages.lm.trainer import fit, lora_stats

    model_dir, tok_src = _sources(config, ctx)
    tok_dir = ctx.path("tokenizer")
    tok_json = prepare_tokenizer(tok_src, tok_dir, ctx.logger)
    _check_model(model_dir, tok_json, config)
    check_lora_model(config.lora, model_dir, "sft")
    summary = _prepare_data(config, tok_json, ctx)
    _check_rows(config, summary)
    task = SFTTask(model_dir=model_dir, tokenizer_dir=tok_dir, data_dir=ctx.path("data"),
                   max_len=config.max_len, packing=config.packing, pad_id=_pad_id(tok_json))
    result = fit(task, config, ctx, lora=config.lora, baseline=BASELINE)
    base = _baseline(ctx)
    final = result.metrics.get("eval_loss")
    stats = {"data": summary, "steps": result.steps, "base_eval_loss": base, "eval_loss": final,
             "model_dir": result.model_dir, "io": result.io, **lora_stats(config.lora, result)}
    counts = {f"data/{split}_{k}": float(v) for split in ("train", "val")
              for k, v in summary[split].items() if isinstance(v, int | float)}
    ctx.tracker.log_metrics(counts, step=result.steps)
    if final is not None and final >= base:
        ctx.logger.warning("sft: held-out loss %.4f is not below the starting model's %.4f", final, base)
    storage.write_json(ctx.path("stats.json"), stats)
    return stats
