"""The pretrain ``TrainTask``: packed rows of the tokenize stage, next-token cross-entropy."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline import storage
from stages.lm.presets import ModelSpec
from stages.lm.trainer import TrainTask


def _init_config(init_dir: str, vocab_size: int, seq_len: int):
    """The shape of the model continued from ``init_dir``; it must cover the data's vocabulary and rows."""
    from pipeline.errors import ConfigError
    from stages.lm.hf import model_config_from_hf

    path = storage.join(init_dir, "config.json")
    if not storage.exists(path):
        raise ConfigError("stages.pretrain.init_from",
                          f"{init_dir} is not a model directory (no config.json)")
    cfg = model_config_from_hf(storage.read_json(path))
    if cfg.vocab_size < vocab_size or cfg.max_seq_len < seq_len:
        raise ConfigError("stages.pretrain.init_from",
                          f"the model in {init_dir} (vocab {cfg.vocab_size}, {cfg.max_seq_len} positions) "
                          f"does not cover the data (vocab {vocab_size}, rows of {seq_len} tokens)")
    return cfg


def _same_tokens(manifests: dict[str, dict]) -> None:
    """Mixture sources must share one tokenizer and row length, or their ids would mean different text."""
    from pipeline.errors import ConfigError

    keys = {n: (m["tokenizer_sha256"], m["vocab_size"], m["seq_len"]) for n, m in manifests.items()}
    first = next(iter(keys))
    for name, key in keys.items():
        if key != keys[first]:
            raise ConfigError(f"stages.pretrain.data.{name}",
                              f"tokenized with another tokenizer or row length than {first!r} "
                              f"(vocab {key[1]} vs {keys[first][1]}, seq_len {key[2]} vs {keys[first][2]}); "
                              f"give its tokenize stage `inputs: {{tokenizer: {first}}}`")


class PretrainTask(TrainTask):
    """``sources``: ``{name: a tokenize stage's output}`` (``manifest.json``, ``train/``, ``val/``,
    ``tokenizer/``); with ``weights`` and more than one source, training samples the sources in those
    proportions (``stages.lm.mixture``); ``repeat=False`` ends the run when a source runs out."""

    def __init__(self, sources: dict[str, str] | str, model: ModelSpec, doc_mask: bool = False,
                 init_dir: str | None = None, weights: dict[str, float] | None = None, repeat: bool = True):
        self.sources = {"data": str(sources)} if isinstance(sources, str) else dict(sources)
        self.weights = weights if weights and len(self.sources) > 1 else None
        self.repeat = repeat
        manifests = {n: storage.read_json(storage.join(d, "manifest.json")) for n, d in self.sources.items()}
        _same_tokens(manifests)
        self.data_dir = next(iter(self.sources.values()))
        manifest = manifests[next(iter(self.sources))]
        self.vocab_size: int = manifest["vocab_size"]
        self.seq_len: int = manifest["seq_len"]
        self.tokenizer_dir = storage.join(self.data_dir, manifest.get("tokenizer", "tokenizer"))
        self.init_dir = init_dir  # continued pretraining: start from this model's weights and shape
        self.model_config = (_init_config(init_dir, self.vocab_size, self.seq_len) if init_dir else
                             model.resolve(self.vocab_size, self.seq_len, path="stages.pretrain.model"))
        self.doc_mask = doc_mask

    def build_model(self):
        from stages.lm.model import CausalLM

        if self.init_dir:
            from stages.lm.hf import import_hf

            return import_hf(self.init_dir)
        return CausalLM(self.model_config)

    def train_loader(self, rank: int, world_size: int, micro_batch: int, seed: int, accum: int = 1):
        from stages.lm.data import Loader, PackedDataset

        if self.weights:
            from stages.lm.mixture import MixtureLoader

            datasets = {n: PackedDataset(d, "train") for n, d in self.sources.items()}
            return MixtureLoader(datasets, self.weights, micro_batch, rank, world_size, seed=seed,
                                 doc_mask=self.doc_mask, accum=accum, repeat=self.repeat)
        return Loader(PackedDataset(self.data_dir, "train"), micro_batch, rank, world_size, seed=seed,
                      shuffle=True, doc_mask=self.doc_mask, drop_last=True, accum=accum)

    def val_batches(self, rank: int, world_size: int, micro_batch: int, limit: int) -> Iterator[dict]:
        """The first rows of the val split in order, wrapped around when the split is smaller than one
        global batch, so every rank gets the same number of full batches."""
        from stages.lm.data import PackedDataset

        sets = [PackedDataset(d, "val") for d in self.sources.values()]
        # a mixture validates on every source's val rows, interleaved: row i of each source in turn
        which = np.concatenate([np.full(len(ds), k) for k, ds in enumerate(sets)])
        order = np.argsort(np.concatenate([np.arange(len(ds)) for ds in sets]), kind="stable")
        which, index = which[order], np.concatenate([np.arange(len(ds)) for ds in sets])[order]
        n = min(limit, -(-len(which) // (micro_batch * world_size)))
        rows = np.arange(n * micro_batch * world_size) % len(which)
        for b in range(n):
            start = (b * world_size + rank) * micro_batch
            pick = rows[start: start + micro_batch]
            if len(sets) == 1:
                yield sets[0].batch(index[pick], doc_mask=self.doc_mask)
            else:
                from stages.lm.mixture import gather

                yield gather(sets, which[pick], index[pick], self.doc_mask)

    def loss(self, model, batch: dict):
        return model(**batch, return_logits=False).loss, {}

    def tokens(self, batch: dict) -> int:
        return int(batch["input_ids"].numel())
