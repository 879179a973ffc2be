"""Reference log-probabilities: computed once, before training, in a resumable pass.

The reference model (the sft model, frozen) scores every pair of a split; the (N, 2) float32 summed
log-probabilities of (chosen, rejected) are written per shard of ``SHARD_PAIRS`` pairs as
``reference/<split>/part-<k>.npy`` followed by a ``part-<k>.done`` marker. The pass runs as one Ray task
per training worker (same resources), each taking every n-th shard and loading the model once. A rerun
after a kill skips the marked shards, and every shard is a pure function of the model and the pairs,
so the result is byte-identical to an uninterrupted pass. Training then holds a single model.

The same ``pair_logps`` scores the policy in training and the frozen in-memory reference (the other
mode), on the same fixed-shape batches, so both modes see identical reference values.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage

SHARD_PAIRS = 256


def pair_logps(model: Any, batch: dict[str, Any]) -> Any:
    """Summed completion log-probabilities of every row of a (2B, T) pair batch: a (2B,) float32 tensor
    (chosen rows first). ``model`` is a ``CausalLM`` or an engine wrapping one."""
    from stages.dpo.loss import sequence_logps

    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    return sequence_logps(out["logits"], batch["labels"])


def load_reference_model(model_dir: str, device: Any, dtype: Any) -> Any:
    """The frozen reference: the model in ``model_dir`` in eval mode, without gradients."""
    from stages.lm.hf import import_hf

    model = import_hf(model_dir).to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def _part(ref_dir: str, k: int, suffix: str) -> str:
    return storage.join(ref_dir, f"part-{k:05d}.{suffix}")


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class ReferenceJob:
    """One split's reference pass: picklable, so it runs in-process or as a Ray task."""

    model_dir: str
    pairs_path: str
    ref_dir: str
    max_len: int
    pad_id: int
    batch_size: int
    use_gpu: bool = False
    shard_pairs: int = SHARD_PAIRS
    worker: int = 0  # this job takes shards k with k % workers == worker
    workers: int = 1

    def shards(self, n: int) -> list[tuple[int, int, int]]:
        """(k, start, end) of every shard of ``n`` pairs."""
        return [(k, s, min(s + self.shard_pairs, n)) for k, s in enumerate(range(0, n, self.shard_pairs))]

    def pending(self, n: int) -> list[tuple[int, int, int]]:
        """This job's shards without a marker."""
        return [sh for sh in self.shards(n) if sh[0] % self.workers == self.worker
                and not storage.exists(_part(self.ref_dir, sh[0], "done"))]

    def split(self, workers: int) -> list[ReferenceJob]:
        """The same pass as ``workers`` jobs over interleaved shards."""
        return [dataclasses.replace(self, worker=w, workers=workers) for w in range(workers)]

    def run(self) -> int:
        """Compute the unmarked shards; returns how many were computed."""
        import torch

        from stages.dpo.data import PairData

        data = PairData.load(self.pairs_path, self.max_len, self.pad_id)
        todo = self.pending(len(data))
        if not todo:
            return 0
        device = torch.device("cuda" if self.use_gpu else "cpu")
        dtype = torch.bfloat16 if self.use_gpu else torch.float32  # the trainer's compute dtype
        model = load_reference_model(self.model_dir, device, dtype)
        for k, start, end in todo:
            out = np.empty((end - start, 2), np.float32)
            with torch.no_grad():
                for s in range(start, end, self.batch_size):
                    e = min(s + self.batch_size, end)
                    batch = {k2: v.to(device) for k2, v in data.batch(np.arange(s, e)).items()}
                    lp = pair_logps(model, batch).cpu().numpy()
                    out[s - start: e - start, 0], out[s - start: e - start, 1] = lp[: e - s], lp[e - s:]
            storage.write_bytes(_part(self.ref_dir, k, "npy"), _npy_bytes(out))
            storage.touch_marker(_part(self.ref_dir, k, "done"))
        return len(todo)


def load_reference(ref_dir: str, n: int) -> np.ndarray:
    """The (n, 2) float32 log-probabilities of a finished pass: its marked shards in order."""
    parts, rows, k = [], 0, 0
    while rows < n:
        if not storage.exists(_part(ref_dir, k, "done")):
            raise FileNotFoundError(f"{ref_dir}: shard {k} of the pass is missing or incomplete "
                                    f"({rows} of {n} pairs scored)")
        parts.append(np.load(io.BytesIO(storage.read_bytes(_part(ref_dir, k, "npy"))), allow_pickle=False))
        rows += len(parts[-1])
        k += 1
    ref = np.concatenate(parts) if parts else np.empty((0, 2), np.float32)
    if ref.shape != (n, 2):
        raise ValueError(f"{ref_dir}: log-probs have shape {ref.shape}, expected ({n}, 2)")
    return ref


def run_jobs(jobs: list[ReferenceJob], workers: int, num_cpus: int) -> int:
    """Run passes on Ray: ``workers`` tasks (``num_cpus`` each, and a GPU when the jobs use one), each
    taking its share of every job's shards. Returns the number of shards computed."""
    import ray

    use_gpu = any(j.use_gpu for j in jobs)

    @ray.remote(num_cpus=num_cpus, num_gpus=1 if use_gpu else 0, max_retries=0)
    def _run(js: list[ReferenceJob]) -> int:
        import torch

        torch.set_num_threads(num_cpus)  # as in the training workers: same kernels, same values
        return sum(j.run() for j in js)

    per_worker = [[j.split(workers)[w] for j in jobs] for w in range(workers)]
    return sum(ray.get([_run.remote(js) for js in per_worker]))
