"""One model's evaluation, run as a Ray task: load ``<stage>/model/``, score everything, return numbers.

The driver tokenizes every input once (the same token ids for every model) and turns the returned
log-probabilities into metrics; the task only runs the model. Work is fp32 on the task's device.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage


@dataclass
class SharedInputs:
    """Inputs common to every model task (put in the Ray object store once)."""

    tokenize_dir: str
    token_bytes: np.ndarray
    mc_requests: list[tuple[list[int], list[int]]] = field(default_factory=list)
    mc_requests_chat: list[tuple[list[int], list[int]]] = field(default_factory=list)  # chat models'
    pref_requests: list[tuple[list[int], list[bool]]] = field(default_factory=list)
    answer_requests: list[tuple[list[int], list[bool]]] = field(default_factory=list)  # sft's val examples
    prompts_raw: list[list[int]] = field(default_factory=list)
    prompts_chat: list[list[int]] = field(default_factory=list)
    stops: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ModelJob:
    """What differs per model task."""

    stage: str
    model_dir: str
    chat: bool
    perplexity: bool
    perplexity_batches: int
    doc_mask: bool
    batch_size: int
    max_new_tokens: int
    use_gpu: bool
    cpus: int


def _local_val_split(tokenize_dir: str, tmp: Path) -> Path:
    """The tokenize stage directory with its manifest and val split, local (downloaded from a URL)."""
    if storage.local(tokenize_dir) is not None:
        return storage.local(tokenize_dir)
    manifest = storage.read_json(storage.join(tokenize_dir, "manifest.json"))
    (tmp / "manifest.json").write_text(storage.read_text(storage.join(tokenize_dir, "manifest.json")))
    for shard in manifest["splits"]["val"]["shards"]:
        dest = tmp / shard["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(storage.read_bytes(storage.join(tokenize_dir, shard["path"])))
    return tmp


def evaluate_model(job: ModelJob, shared: SharedInputs) -> dict[str, Any]:
    """Perplexity metrics, log-probabilities of the multiple-choice, preference and held-out answer
    requests, and the greedy generations' token ids of one model."""
    import torch

    from stages.evaluate.generate import generate_all
    from stages.evaluate.perplexity import evaluate_perplexity
    from stages.evaluate.scoring import Request, score_requests
    from stages.lm.data import PackedDataset
    from stages.lm.hf import import_hf

    torch.set_num_threads(job.cpus)
    torch.manual_seed(0)
    device = torch.device("cuda" if job.use_gpu and torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model = import_hf(job.model_dir).to(device).eval()
    out: dict[str, Any] = {"stage": job.stage, "metrics": {}, "counts": {}, "device": str(device)}
    if job.perplexity:
        with tempfile.TemporaryDirectory(prefix="seedline-eval-") as tmp:
            data = PackedDataset(_local_val_split(shared.tokenize_dir, Path(tmp)), "val")
            if data.vocab_size > model.cfg.vocab_size:
                raise ValueError(
                    f"{job.stage} model has vocab_size {model.cfg.vocab_size}, the tokenized data "
                    f"{data.vocab_size}: not the same tokenizer"
                )
            metrics, counts = evaluate_perplexity(
                model, data, shared.token_bytes, job.batch_size, job.perplexity_batches, device, job.doc_mask
            )
        out["metrics"].update(metrics)
        out["counts"]["perplexity"] = counts
    mc = shared.mc_requests_chat if job.chat else shared.mc_requests
    reqs = [Request.continuation(c, k) for c, k in mc]
    out["mc_logprobs"] = [s.logprob for s in score_requests(model, reqs, job.batch_size, device)]
    reqs = [Request(tuple(ids), tuple(score)) for ids, score in shared.pref_requests]
    out["pref_logprobs"] = [s.logprob for s in score_requests(model, reqs, job.batch_size, device)]
    # chat-formatted for every model: the pretrain model's loss here is sft's starting point
    reqs = [Request(tuple(ids), tuple(score)) for ids, score in shared.answer_requests]
    scores = score_requests(model, reqs, job.batch_size, device)
    out["answer_scores"] = [(s.logprob, s.tokens) for s in scores]
    prompts = shared.prompts_chat if job.chat else shared.prompts_raw
    out["generations"] = generate_all(model, prompts, job.max_new_tokens, shared.stops, job.batch_size)
    out["seconds"] = time.perf_counter() - t0
    return out
