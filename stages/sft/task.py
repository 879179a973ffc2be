"""The sft stage's ``TrainTask``: the prepared rows as batches, and the assistant-only loss.

Everything here runs inside the Ray Train workers; the task holds only paths and numbers (picklable).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from stages.lm.trainer import TrainTask
from stages.sft.data import SFTDataset


def val_indices(rows: int, rank: int, world_size: int, micro_batch: int, limit: int) -> list[np.ndarray]:
    """Row indices of this rank's validation batches: the first ``limit`` global batches of the rows in
    order (at least one; a split smaller than one global batch is shared out evenly). The same number of
    batches on every rank; empty only if ``rows < world_size`` (callers check)."""
    g = micro_batch * world_size
    steps = min(limit, max(1, rows // g))
    return [np.array_split(np.arange(s * g, min((s + 1) * g, rows)), world_size)[rank] for s in range(steps)]


@dataclass
class SFTTask(TrainTask):
    """Fine-tune the model in ``model_dir`` on ``data_dir``'s ``train.arrow`` / ``val.arrow``."""

    model_dir: str
    tokenizer_dir: str
    data_dir: str
    max_len: int
    packing: bool
    pad_id: int

    def dataset(self, split: str) -> SFTDataset:
        return SFTDataset(storage.join(self.data_dir, f"{split}.arrow"), self.max_len, self.pad_id, split)

    def build_model(self):
        from stages.lm.hf import import_hf

        return import_hf(self.model_dir)

    def train_loader(self, rank: int, world_size: int, micro_batch: int, seed: int, accum: int = 1):
        from stages.lm.data import Loader

        return Loader(self.dataset("train"), micro_batch, rank, world_size, seed=seed, shuffle=True,
                      doc_mask=self.packing, drop_last=True, accum=accum)

    def val_batches(self, rank: int, world_size: int, micro_batch: int, limit: int) -> Iterator[dict]:
        ds = self.dataset("val")
        for idx in val_indices(len(ds), rank, world_size, micro_batch, limit):
            yield ds.batch(idx, doc_mask=self.packing)

    def tokens(self, batch: dict) -> int:
        """Real tokens of the micro-batch (packed rows end in padding): what tokens/s counts."""
        return int((batch["input_ids"] != self.pad_id).sum())

    def loss(self, model, batch: dict) -> tuple[Any, dict[str, Any]]:
        """Mean cross-entropy over the trained (assistant) tokens of the micro-batch."""
        out = model(**batch, return_logits=False)
        return out.loss, {}
