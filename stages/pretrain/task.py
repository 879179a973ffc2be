"""The pretrain ``TrainTask``: packed rows of the tokenize stage, next-token cross-entropy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stages.lm.presets import ModelSpec
from stages.lm.trainer import TrainTask


class PretrainTask(TrainTask):
    """``data_dir``: the tokenize stage's output (``manifest.json``, ``train/``, ``val/``, ``tokenizer/``)."""

    def __init__(self, data_dir: str, model: ModelSpec, doc_mask: bool = False):
        self.data_dir = str(data_dir)
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
        self.vocab_size: int = manifest["vocab_size"]
        self.seq_len: int = manifest["seq_len"]
        self.tokenizer_dir = str(Path(data_dir) / manifest.get("tokenizer", "tokenizer"))
        self.model_config = model.resolve(self.vocab_size, self.seq_len, path="stages.pretrain.model")
        self.doc_mask = doc_mask

    def build_model(self):
        from stages.lm.model import CausalLM

        return CausalLM(self.model_config)

    def train_loader(self, rank: int, world_size: int, micro_batch: int, seed: int):
        from stages.lm.data import Loader, PackedDataset

        return Loader(PackedDataset(self.data_dir, "train"), micro_batch, rank, world_size, seed=seed,
                      shuffle=True, doc_mask=self.doc_mask, drop_last=True)

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
