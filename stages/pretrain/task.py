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


class PretrainTask(TrainTask):
    """``data_dir``: the tokenize stage's output (``manifest.json``, ``train/``, ``val/``, ``tokenizer/``)."""

    def __init__(self, data_dir: str, model: ModelSpec, doc_mask: bool = False, init_dir: str | None = None):
        self.data_dir = str(data_dir)
        manifest = storage.read_json(storage.join(self.data_dir, "manifest.json"))
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

        return Loader(PackedDataset(self.data_dir, "train"), micro_batch, rank, world_size, seed=seed,
                      shuffle=True, doc_mask=self.doc_mask, drop_last=True, accum=accum)

    def val_batches(self, rank: int, world_size: int, micro_batch: int, limit: int) -> Iterator[dict]:
        """The first rows of the val split in order, wrapped around when the split is smaller than one
        global batch, so every rank gets the same number of full batches."""
        from stages.lm.data import PackedDataset

        ds = PackedDataset(self.data_dir, "val")
        n = min(limit, -(-len(ds) // (micro_batch * world_size)))
        rows = np.arange(n * micro_batch * world_size) % len(ds)
        for b in range(n):
            start = (b * world_size + rank) * micro_batch
            yield ds.batch(rows[start: start + micro_batch], doc_mask=self.doc_mask)

    def loss(self, model, batch: dict):
        return model(**batch, return_logits=False).loss, {}

    def tokens(self, batch: dict) -> int:
        return int(batch["input_ids"].numel())
