"""The DPO ``TrainTask``: pair batches in, DPO loss and TRL's metrics out (runs in the trainer's workers)."""

from __future__ import annotations

from typing import Any

from pipeline import storage
from stages.dpo.data import PairData, PairLoader, val_batches
from stages.dpo.loss import dpo_loss
from stages.dpo.reference import load_reference, load_reference_model, pair_logps
from stages.lm.trainer import TrainTask


class DPOTask(TrainTask):
    """Policy = the model in ``model_dir``; reference = precomputed log-probs in ``<out>/reference`` or,
    with ``reference="in_memory"``, a frozen copy of that model built in each worker; with ``lora`` and
    ``in_memory``, the policy itself with its adapters disabled (the frozen base: no second model).

    Chosen and rejected sequences of a micro-batch go through the policy in one forward pass.
    """

    def __init__(self, model_dir: str, tokenizer_dir: str, out_dir: str, max_len: int, pad_id: int,
                 beta: float, loss_type: str, label_smoothing: float, reference: str, lora: bool = False):
        self.model_dir, self.tokenizer_dir, self.out_dir = model_dir, tokenizer_dir, out_dir
        self.max_len, self.pad_id = max_len, pad_id
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.reference, self.lora = reference, lora
        self._data: dict[str, PairData] = {}
        self._ref_model: Any = None

    def __getstate__(self) -> dict[str, Any]:  # caches stay in the process that built them
        return {k: v for k, v in self.__dict__.items() if k not in ("_data", "_ref_model")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _data={}, _ref_model=None)

    def data(self, split: str) -> PairData:
        """The split's pairs (with precomputed reference log-probs in that mode), loaded once."""
        if split not in self._data:
            path = storage.join(self.out_dir, "pairs", f"{split}.arrow")
            data = PairData.load(path, self.max_len, self.pad_id)
            if self.reference == "precompute":
                data.ref = load_reference(storage.join(self.out_dir, "reference", split), len(data))
            self._data[split] = data
        return self._data[split]

    def build_model(self):
        from stages.lm.hf import import_hf

        return import_hf(self.model_dir)

    def train_loader(self, rank: int, world_size: int, micro_batch: int, seed: int,
                     accum: int = 1) -> PairLoader:
        return PairLoader(self.data("train"), micro_batch, rank, world_size, seed, accum)

    def val_batches(self, rank: int, world_size: int, micro_batch: int, limit: int) -> list[dict]:
        return val_batches(self.data("val"), rank, world_size, micro_batch, limit)

    def _reference_logps(self, model, batch: dict):
        import torch

        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self.lora:
            from stages.lm.lora import adapters_disabled

            with torch.no_grad(), adapters_disabled(model):
                return pair_logps(model, batch)
        if self._ref_model is None:
            module = getattr(model, "module", model)
            dtype = next(module.parameters()).dtype  # the engine's compute dtype (bf16 on GPU)
            self._ref_model = load_reference_model(self.model_dir, batch["input_ids"].device, dtype)
        with torch.no_grad():
            return pair_logps(self._ref_model, batch)

    def loss(self, model, batch: dict):
        """Mean DPO loss over the micro-batch's pairs and TRL's metrics (``stages.dpo.loss.dpo_loss``)."""
        logps = pair_logps(model, batch)  # (2B,): chosen rows, then rejected rows
        ref = self._reference_logps(model, batch)
        B = logps.shape[0] // 2
        return dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], self.beta, self.loss_type,
                        self.label_smoothing)

    def tokens(self, batch: dict) -> int:
        """Real (non-padding) tokens of the chosen and rejected sequences."""
        return int((batch["input_ids"] != self.pad_id).sum())
