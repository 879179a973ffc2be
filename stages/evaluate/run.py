"""The evaluate stage: every upstream model (pretrain, sft, dpo: those present) on the same evaluations.

Steps, each resumable:

1. inputs (driver): the tokenizer, multiple-choice tasks, prompts, the dpo stage's held-out pairs and the
   sft stage's held-out examples are read and tokenized once; bad records are quarantined in
   ``rejects/<task>.jsonl`` with the reason;
2. one Ray task per model (GPU when configured) scores perplexity, answers, choices, pairs and generates; each
   finished model is saved as ``models/<stage>.json`` (a marker: a rerun skips it);
3. metrics per model, the comparison table ``results.md``, ``generations.jsonl``, charts ``charts/*.png``,
   all logged to MLflow (metrics named ``<stage>/<metric>``);
4. the best model by ``registry.metric`` is logged and registered (``registered.json``);
5. ``results.json`` is written last: the stage's completion marker.

Outputs contain no timings, so a killed and resumed stage ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.errors import SeedlineError
from pipeline.stage import Output, StageContext
from stages.evaluate import answers, charts, generate, multiple_choice, preference
from stages.evaluate.config import EvaluateConfig
from stages.evaluate.lineage import decontamination, lineage_tags
from stages.evaluate.records import write_rejects
from stages.evaluate.report_md import baselines, results_markdown
from stages.evaluate.worker import ModelJob, SharedInputs, evaluate_model


@dataclass
class Inputs:
    shared: SharedInputs
    tasks: list[tuple[Any, list[multiple_choice.Example]]]
    prompts: list[str]
    pairs: int
    answers: int
    rejects: dict[str, int]


def _tokenizer_json(ctx: StageContext) -> str:
    return storage.read_text(storage.join(ctx.input("tokenizer").path, "tokenizer.json"))


def model_inputs(ctx: StageContext) -> dict[str, Output]:
    """``{instance: model handle}`` of the models to evaluate, in binding order."""
    return {m.instance: m for m in ctx.input_list("models")}


def is_chat(config: EvaluateConfig, model: Output) -> bool:
    """Chat models (named by instance or by stage type) get their prompts in the chat template."""
    return model.instance in config.chat_models or model.type in config.chat_models


def prepare_inputs(config: EvaluateConfig, ctx: StageContext) -> Inputs:
    """Read and tokenize every input once; quarantine bad records."""
    from tokenizers import Tokenizer

    from stages.evaluate.perplexity import token_bytes

    tokenize_dir = ctx.input("data").path
    manifest = storage.read_json(storage.join(tokenize_dir, "manifest.json"))
    tok_json = _tokenizer_json(ctx)
    tok = Tokenizer.from_str(tok_json)
    check_tokenizers(list(model_inputs(ctx).values()), tok_json)
    shared = SharedInputs(
        tokenize_dir, token_bytes(tok_json, manifest["vocab_size"]), stops=generate.stop_ids(tok)
    )
    rejects: dict[str, int] = {}
    tasks = []
    any_chat = any(is_chat(config, m) for m in model_inputs(ctx).values())  # chat requests only if needed
    for task in config.tasks:
        examples, bad = multiple_choice.load_task(task)
        write_rejects(ctx.path("rejects", f"{task.name}.jsonl"), bad)
        rejects[task.name] = len(bad)
        shared.mc_requests += multiple_choice.build_requests(task, examples, tok)
        if any_chat:
            shared.mc_requests_chat += multiple_choice.build_requests(task, examples, tok, chat=True)
        tasks.append((task, examples))
    prompts: list[str] = []
    if config.prompts:
        prompts, bad = generate.load_prompts(config.prompts)
        write_rejects(ctx.path("rejects", "prompts.jsonl"), bad)
        rejects["prompts"] = len(bad)
        for chat, dest in ((False, shared.prompts_raw), (True, shared.prompts_chat)):
            dest += [
                tok.encode(generate.format_prompt(p, chat), add_special_tokens=False).ids for p in prompts
            ]
    if _use_preference(config, ctx):
        shared.pref_requests = preference.load_requests(ctx.input("pairs").path, config.preference_limit)
    if _use_answers(config, ctx):
        shared.answer_requests = answers.load_requests(ctx.input("answers").path, config.answer_limit)
    pairs, examples = len(shared.pref_requests) // 2, len(shared.answer_requests)
    return Inputs(shared, tasks, prompts, pairs, examples, rejects)


def _use_preference(config: EvaluateConfig, ctx: StageContext) -> bool:
    pairs = ctx.input("pairs")
    if config.preference is False or pairs is None:
        return False
    path = pairs.path
    if storage.exists(path):
        return True
    if config.preference is True:
        raise SeedlineError(f"evaluate: preference is true but the dpo stage has no held-out pairs at {path}")
    ctx.logger.warning("evaluate: no held-out pairs at %s; preference accuracy skipped", path)
    return False


def _use_answers(config: EvaluateConfig, ctx: StageContext) -> bool:
    val = ctx.input("answers")
    if config.answer_loss is False or val is None:
        return False
    if storage.exists(val.path):
        return True
    if config.answer_loss is True:
        raise SeedlineError(
            f"evaluate: answer_loss is true but the sft stage has no held-out split at {val.path}")
    ctx.logger.warning("evaluate: no held-out sft examples at %s; answer loss skipped", val.path)
    return False


def check_tokenizers(models: list[Output], tok_json: str) -> None:
    """Every model must use the tokenize stage's tokenizer: inputs are tokenized once, for all of them."""
    want = json.loads(tok_json)
    for m in models:
        path = storage.join(m.path, "tokenizer.json")
        if storage.exists(path) and json.loads(storage.read_text(path)) != want:
            raise SeedlineError(f"evaluate: the {m.instance} model's tokenizer ({path}) differs from the "
                                "tokenize stage's; models evaluated together must share one tokenizer")


def _job(config: EvaluateConfig, model: Output) -> ModelJob:
    return ModelJob(
        stage=model.instance,
        model_dir=model.path,
        chat=is_chat(config, model),
        perplexity=config.perplexity.enabled,
        perplexity_batches=config.perplexity.batches,
        doc_mask=config.perplexity.doc_mask,
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
        use_gpu=config.scaling.use_gpu,
        cpus=config.scaling.cpus,
    )


def evaluate_models(
    config: EvaluateConfig, ctx: StageContext, stages: list[str], shared: SharedInputs
) -> dict[str, dict[str, Any]]:
    """One Ray task per model not yet evaluated; every model's saved result."""
    path = {s: ctx.path("models", f"{s}.json") for s in stages}
    todo = [s for s in stages if not storage.exists(path[s])]
    ctx.progress.update(
        step="models", done=len(stages) - len(todo), total=len(stages), unit="models", force=True
    )
    if todo:
        ctx.init_ray()
        import ray

        shared_ref = ray.put(shared)
        task = ray.remote(evaluate_model).options(
            num_cpus=config.scaling.cpus, num_gpus=1 if config.scaling.use_gpu else 0, max_retries=1
        )
        refs = {
            task.remote(_job(config, model_inputs(ctx)[s]), shared_ref): s
            for s in todo
        }
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            result = ray.get(ready[0])
            stage = refs[ready[0]]
            seconds = result.pop("seconds")
            storage.write_json(path[stage], result)
            ctx.tracker.log_metrics({f"{stage}/eval_seconds": seconds})
            ctx.logger.info("evaluate: %s done in %.1fs on %s", stage, seconds, result["device"])
            ctx.progress.update(
                step="models", done=len(stages) - len(pending), total=len(stages), unit="models", force=True
            )
    return {s: storage.read_json(path[s]) for s in stages}


def model_metrics(
    config: EvaluateConfig, ctx: StageContext, inputs: Inputs, results: dict[str, dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """``{stage: {metric: value}}`` from the models' raw scores."""
    out: dict[str, dict[str, float]] = {}
    for stage, res in results.items():
        m = dict(res["metrics"])
        k = 0
        for task, examples in inputs.tasks:
            scored = examples[: task.limit] if task.limit else examples
            n = sum(len(ex.choices) for ex in scored)
            m.update(
                multiple_choice.task_metrics(task.name, examples, res["mc_logprobs"][k : k + n], task.limit)
            )
            k += n
        if inputs.pairs:
            m.update(preference.logp_accuracy(res["pref_logprobs"]))
        if inputs.answers:
            m.update(answers.answer_metrics(res["answer_scores"]))
        out[stage] = m
    pairs = ctx.input("pairs")
    dpo = pairs.instance if pairs is not None else None
    if inputs.pairs and dpo in results:
        ref = _reference_logps(ctx, inputs, results)
        if ref is not None:
            beta = float(pairs.config.get("beta", 0.1))
            out[dpo].update(preference.reward_metrics(results[dpo]["pref_logprobs"], ref, beta))
    return out


def _reference_logps(ctx: StageContext, inputs: Inputs, results: dict[str, dict[str, Any]]) -> Any:
    """The dpo reference's log-probs: its starting model's (the instance bound to the dpo stage's model
    input), scored here when evaluated too; else those the dpo stage saved."""
    pairs = ctx.input("pairs")
    start = [n for n in pairs.inputs.get("model", ()) if n in results]
    if start:
        return results[start[0]]["pref_logprobs"]
    from stages.dpo.reference import load_reference

    reference = ctx.input("reference")
    try:
        if reference is None:
            raise FileNotFoundError("the dpo stage declares no reference log-probs")
        total = preference.pair_count(pairs.path)
        return load_reference(reference.path, total)[: inputs.pairs].reshape(-1)
    except (FileNotFoundError, KeyError) as e:
        ctx.logger.warning(
            "evaluate: no reference log-probs for the dpo model (%s); pref_accuracy skipped", e
        )
        return None


def write_outputs(
    config: EvaluateConfig,
    ctx: StageContext,
    inputs: Inputs,
    models: dict[str, dict[str, float]],
    raw: dict[str, dict[str, Any]],
) -> dict[str, bytes]:
    """generations.jsonl, results.md and the charts; returns the charts."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_tokenizer_json(ctx))
    handles = model_inputs(ctx)
    lines = []
    for stage, res in raw.items():
        for i, (prompt, ids) in enumerate(zip(inputs.prompts, res["generations"], strict=True)):
            lines.append(
                json.dumps(
                    {
                        "model": stage,
                        "index": i,
                        "prompt": prompt,
                        "chat": is_chat(config, handles[stage]),
                        "generation": tok.decode(ids, skip_special_tokens=False),
                        "tokens": len(ids),
                    },
                    ensure_ascii=False,
                )
            )
    storage.write_text(ctx.path("generations.jsonl"), "".join(line + "\n" for line in lines))
    pngs = charts.metric_charts(models)
    for name, png in pngs.items():
        storage.write_bytes(ctx.path("charts", name), png)
    return pngs


def register_best(
    config: EvaluateConfig, ctx: StageContext, models: dict[str, dict[str, float]]
) -> dict | None:
    """Register the best model once (``registered.json``); None when disabled or tracking is off."""
    from stages.evaluate.registry import best_model, register_model

    marker = ctx.path("registered.json")
    done = storage.read_json_or(marker, None)
    if done is not None or not config.registry.enabled:
        return done
    uri = getattr(ctx.tracker, "uri", None)
    if not uri or not getattr(ctx.tracker, "run_id", None):
        ctx.logger.warning("evaluate: MLflow tracking is off; the best model is not registered")
        return None
    stage, value = best_model(models, config.registry)
    metric = config.registry.metric
    why = (f"best of {len(models)} by {metric}, {config.registry.mode} {value:.4g}" if metric else
           f"the last model of the chain {' -> '.join(models)}, no registry.metric set")
    tags = lineage_tags(ctx) | {"seedline.stage": stage, "seedline.why": why}
    if metric:
        tags |= {"seedline.metric": metric, "seedline.metric_value": repr(value)}
    reg = register_model(
        uri,
        ctx.tracker.run_id,
        model_inputs(ctx)[stage].path,
        stage,
        config.registry,
        tags,
    )
    reg |= {"metric": metric, "value": value, "why": why}
    storage.write_json(marker, reg)
    ctx.logger.info("evaluate: registered %s as %s: %s", stage, reg["uri"], why)
    return reg


def log_model_runs(ctx: StageContext, models: dict[str, dict[str, float]]) -> None:
    """One nested MLflow run per model under the evaluate run, every model with the same metric names, so
    MLflow's compare view puts the models side by side. Their ids are kept in ``mlflow_models.json`` (a
    resumed stage logs into the same runs)."""
    uri, parent = getattr(ctx.tracker, "uri", None), getattr(ctx.tracker, "run_id", None)
    if not uri or not parent:
        return
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_run(parent).info.experiment_id
    path = ctx.path("mlflow_models.json")
    known = storage.read_json_or(path, {})
    handles = model_inputs(ctx)
    now = int(time.time() * 1000)
    for model, vals in models.items():
        h = handles[model]
        if model not in known:
            tags = {"mlflow.parentRunId": parent, "seedline.model": model, "seedline.type": h.type,
                    "seedline.fingerprint": h.fingerprint, "seedline.model_dir": h.path}
            known[model] = client.create_run(experiment, run_name=f"eval {model}", tags=tags).info.run_id
            storage.write_json(path, known)
        client.log_batch(known[model], metrics=[Metric(k, float(v), now, 0) for k, v in sorted(vals.items())],
                         params=[Param("model", model), Param("type", h.type)])
        client.set_terminated(known[model], "FINISHED")


def log_to_mlflow(ctx: StageContext, models: dict[str, dict[str, float]], pngs: dict[str, bytes]) -> None:
    log_model_runs(ctx, models)
    for name in pngs:
        ctx.tracker.log_artifact(
            storage.local(ctx.path("charts", name)) or _tmp_copy(ctx.path("charts", name)), "charts"
        )
    for name in ("results.md", "generations.jsonl"):
        ctx.tracker.log_text(storage.read_text(ctx.path(name)), f"evaluate/{name}")


def _tmp_copy(path: str) -> str:
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="seedline-chart-"))
    (d / path.rsplit("/", 1)[-1]).write_bytes(storage.read_bytes(path))
    return str(d / path.rsplit("/", 1)[-1])


def run(config: EvaluateConfig, ctx: StageContext) -> dict[str, Any]:
    """Evaluate the upstream models; returns (and writes) ``results.json``."""
    done = storage.read_json_or(ctx.path("results.json"), None)
    if done is not None:
        return done
    stages = list(model_inputs(ctx))
    if not stages:
        raise SeedlineError("evaluate: no upstream model stage (pretrain, sft or dpo)")
    t0 = time.perf_counter()
    inputs = prepare_inputs(config, ctx)
    raw = evaluate_models(config, ctx, stages, inputs.shared)
    models = model_metrics(config, ctx, inputs, raw)
    results: dict[str, Any] = {
        "models": models,
        "order": stages,
        "counts": {
            "tasks": {t.name: len(ex[: t.limit] if t.limit else ex) for t, ex in inputs.tasks},
            "prompts": len(inputs.prompts),
            "preference_pairs": inputs.pairs,
            "answer_examples": inputs.answers,
            "perplexity": raw[stages[0]]["counts"].get("perplexity"),
        },
        "baselines": baselines([(t.name, ex[: t.limit] if t.limit else ex) for t, ex in inputs.tasks],
                               inputs.pairs, inputs.answers),
        "rejects": inputs.rejects,
        "decontamination": decontamination(ctx),  # ran upstream? against which evaluation sets?
    }
    pngs = write_outputs(config, ctx, inputs, models, raw)
    results["registered"] = register_best(config, ctx, models)
    storage.write_text(
        ctx.path("results.md"), results_markdown(models, results["counts"], results["registered"],
                                                results["baselines"])
    )
    log_to_mlflow(ctx, models, pngs)
    ctx.tracker.log_metrics({"eval_seconds": time.perf_counter() - t0})
    ctx.tracker.log_dict(results, "evaluate/results.json")
    storage.write_json(ctx.path("results.json"), results)  # the completion marker, last
    ctx.progress.update(step="done", done=len(stages), total=len(stages), unit="models", force=True)
    for name, metrics in models.items():  # one readable line per model; every digit is in results.json
        line = ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}"
                         for k, v in sorted(metrics.items()))
        ctx.logger.info("evaluate: %s: %s", name, line)
    return results
