"""The tokenize stage: tokenizer, parallel encoding, packing into Arrow shards. Steps (each resumable):

1. **tokenizer**: load ``tokenizer.path``, or train a byte-level BPE on the ``sample_docs`` documents with
   the smallest seeded id hash (a Ray task per input file finds each file's candidates); saved to
   ``tokenizer/``; marker ``work/tokenizer.json``.
2. **encode** (Ray task per input file, ``encode.py``): documents to token ids + end-of-text, split
   train/val by id hash; marker ``work/enc/NNNNN.json``.
3. **pack** (Ray task per output shard, ``pack.py``): rows of ``seq_len + 1`` tokens into
   ``<split>/part-NNNNN.arrow``; marker ``work/pack/<split>/NNNNN.json``.
4. **finalize**: ``manifest.json``, then ``stats.json`` (written last: the stage is done), metrics to the
   tracker; the encoded intermediates are deleted.

Every output depends only on the input and the non-volatile config, never on worker count or timing,
so a killed run resumes (skipping marked work) to byte-identical files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any

from pipeline import storage
from pipeline.errors import SeedlineError
from pipeline.stage import StageContext
from stages.common.tasks import run_keyed_tasks
from stages.tokenize import fast_bpe
from stages.tokenize import tokenizer as tk
from stages.tokenize.config import TokenizeConfig
from stages.tokenize.encode import EncodeParams, encode_file
from stages.tokenize.finalize import build_manifest, build_stats
from stages.tokenize.layout import SPLITS, Layout
from stages.tokenize.pack import SplitPlan, pack_shard
from stages.tokenize.sources import Sources, find_sources, sample_file, split_text, val_threshold

# Test hook: "encode:N" or "pack:N" makes the driver exit hard (no cleanup) once N tasks of that step
# have completed in this process, to prove that a killed run resumes to identical output.
KILL_ENV = "SEEDLINE_TOKENIZE_KILL_AFTER"


def _check_plan(lay: Layout, sources: Sources, ctx: StageContext) -> None:
    """Record the input list; if a resumed run sees different inputs, start the stage over."""
    plan = {"origin": sources.origin, "inputs": [[f.path, f.rel] for f in sources.files]}
    old = storage.read_json_or(lay.plan, None)
    if old is not None and old != plan:
        ctx.logger.warning("tokenize: input files changed since the interrupted run; starting over")
        for name in ("work", "tokenizer", *SPLITS, "rejects", "manifest.json", "stats.json"):
            storage.remove(lay.p(name), recursive=True)
    if old != plan:
        storage.write_json(lay.plan, plan)


def _run_tasks(ctx: StageContext, step: str, keys: list[Hashable], marker: Callable[[Any], str],
               fn: Callable[..., dict[str, Any]], args: Callable[[Any], tuple], workers: int,
               ) -> dict[Any, dict[str, Any]]:
    """Run ``fn(*args(key))`` as a Ray task (at most ``workers`` at once) for every key without a marker."""
    return run_keyed_tasks(ctx, step, keys, marker, fn, args, workers=workers, kill_env=KILL_ENV)


def _training_texts(config: TokenizeConfig, sources: Sources, ctx: StageContext) -> list[str]:
    """The tokenizer's training sample, in a fixed order, long documents cut like for encoding."""
    import ray

    k = config.tokenizer.train.sample_docs
    task = ray.remote(num_cpus=1)(sample_file)
    refs = [task.remote(sources, f, k, config.seed) for f in sources.files]
    found = sorted(item for part in ray.get(refs) for item in part)[:k]
    if not found:
        raise SeedlineError("tokenize: no documents to train the tokenizer on (the input is empty)")
    ctx.logger.info("tokenize: training a BPE tokenizer (vocab %d) on %d documents",
                    config.tokenizer.train.vocab_size, len(found))
    return [piece for _, _, _, text in found for piece in split_text(text, config.max_chunk_chars)]


def _tokenizer(config: TokenizeConfig, sources: Sources, lay: Layout,
               ctx: StageContext) -> tuple[dict[str, Any], str]:
    """Build (or find, when resuming) the tokenizer; returns its info and its ``tokenizer.json`` text."""
    info = storage.read_json_or(lay.tokenizer_done, None)
    if info is None:
        ctx.progress.update(step="tokenizer", force=True)
        t0 = time.perf_counter()
        shared = ctx.input("tokenizer")  # another tokenize instance's: one vocabulary for a data mixture
        if shared is not None or config.tokenizer.path is not None:
            tok = tk.load(shared.path if shared is not None else config.tokenizer.path)
            sample = 0
        else:
            texts = _training_texts(config, sources, ctx)
            tok = tk.train_bpe(texts, config.tokenizer.train)
            sample = len(texts)
        sha = tk.save(tok, lay.tokenizer_dir, config.seq_len)
        vocab = tk.vocab_size(tok)
        info = {"sha256": sha, "vocab_size": vocab, "dtype": tk.token_dtype(vocab),
                "special_token_ids": tk.special_ids(tok),
                "trained": shared is None and config.tokenizer.path is None,
                "sample_pieces": sample, "seconds": time.perf_counter() - t0}
        storage.write_json(lay.tokenizer_done, info)
    return info, storage.read_text(storage.join(lay.tokenizer_dir, "tokenizer.json"))


def _engine(config: TokenizeConfig, tok_json: str, ctx: StageContext) -> str:
    """``tiktoken`` when it encodes this tokenizer with identical ids (``fast_bpe``), else ``tokenizers``."""
    if config.encoder == "tokenizers":
        return "tokenizers"
    enc, why = fast_bpe.fast_encoder(tok_json)
    if enc is None:
        ctx.logger.info("tokenize: encoding with HF tokenizers (tiktoken would not give identical ids: %s)",
                        why)
        return "tokenizers"
    ctx.logger.info("tokenize: encoding with tiktoken (same ids as HF tokenizers, checked)")
    return "tiktoken"


def _remove_intermediates(lay: Layout, n_files: int) -> None:
    for i in range(n_files):
        for s in SPLITS:
            storage.remove(lay.encoded(i, s))


def run(config: TokenizeConfig, ctx: StageContext) -> dict[str, Any]:
    """Tokenize and pack the input into ``ctx.out_dir``; returns the stats also written to stats.json."""
    lay = Layout(ctx.out_dir)
    sources = find_sources(config, ctx)
    done = storage.read_json_or(lay.stats, None)
    if done is not None:  # finished; only the intermediates' removal may have been interrupted
        _remove_intermediates(lay, len(sources.files))
        return done
    _check_plan(lay, sources, ctx)
    ctx.init_ray()
    import ray

    workers = config.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    t0 = time.perf_counter()
    info, tok_json = _tokenizer(config, sources, lay, ctx)
    t1 = time.perf_counter()
    engine = _engine(config, tok_json, ctx)
    busy = max(1, min(workers, len(sources.files)))
    params = EncodeParams(config.seed, val_threshold(config.val_fraction), config.max_chunk_chars,
                          config.batch_chars, info["special_token_ids"]["eot"], info["dtype"], engine,
                          threads=max(1, int(ray.cluster_resources().get("CPU", 1)) // busy))
    tok_ref, src_ref = ray.put(tok_json), ray.put(sources)
    ctx.logger.info("tokenize: encoding %d %s files", len(sources.files), sources.origin)
    keys = [f.index for f in sources.files]
    enc = _run_tasks(ctx, "encode", keys, lay.encode_done, encode_file,
                     lambda k: (src_ref, sources.files[k], tok_ref, params, lay.out), workers)
    enc_list = [enc[k] for k in keys]
    t2 = time.perf_counter()
    pad = info["special_token_ids"]["pad"]
    plans = {s: SplitPlan(s, [lay.encoded(k, s) for k in keys], [enc[k]["tokens"][s] for k in keys],
                          config.seq_len, config.rows_per_shard, info["dtype"], pad) for s in SPLITS}
    shard_keys = [(s, k) for s in SPLITS for k in range(plans[s].shards)]
    packed = _run_tasks(ctx, "pack", shard_keys, lambda sk: lay.pack_done(*sk), pack_shard,
                        lambda sk: (plans[sk[0]], sk[1], lay.out), workers)
    t3 = time.perf_counter()
    manifest = build_manifest(config, info, plans, enc_list, packed)
    storage.write_json(lay.manifest, manifest)
    stats = build_stats(enc_list, manifest)
    storage.write_json(lay.stats, stats)  # the stage's own completion marker
    _remove_intermediates(lay, len(keys))
    ctx.tracker.set_tags({"tokenize.encoder": engine})
    seconds = {"seconds_tokenizer": t1 - t0, "seconds_encode": t2 - t1, "seconds_pack": t3 - t2}
    ctx.tracker.log_metrics({k: float(v) for k, v in stats.items() if isinstance(v, (int, float))})
    ctx.tracker.log_metrics({**seconds, "tokens_per_second": stats["tokens"] / max(t3 - t1, 1e-9)})
    ctx.tracker.log_dict(manifest, "tokenize/manifest.json")
    ctx.tracker.log_dict(stats, "tokenize/stats.json")
    ctx.progress.update(step="done", done=len(shard_keys), total=len(shard_keys), unit="tasks", force=True)
    ctx.logger.info("tokenize: %d docs (%d rejected) -> %d train / %d val tokens in %d + %d rows",
                    stats["docs"], stats["docs_rejected"], stats["tokens_train"], stats["tokens_val"],
                    stats["rows_train"], stats["rows_val"])
    return stats
