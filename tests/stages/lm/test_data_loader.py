"""The packed-shard dataset and loader, on shards written by the tokenize stage's own pack step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import storage
from stages.lm.data import Loader, PackedDataset
from stages.tokenize.config import TokenizeConfig
from stages.tokenize.encode import encoded_schema
from stages.tokenize.finalize import build_manifest
from stages.tokenize.layout import SPLITS, Layout
from stages.tokenize.pack import SplitPlan, pack_shard

SEQ_LEN, ROWS_PER_SHARD = 16, 7
IDS = {"eot": 0, "pad": 1, "im_start": 2, "im_end": 3}


def _write_packed(out: Path, docs: list[np.ndarray], dtype: str, vocab: int) -> np.ndarray:
    """Pack ``docs`` (token arrays without end-of-text) as the train split; returns the token stream."""
    lay = Layout(str(out))
    with_eot = [np.append(d, IDS["eot"]).astype(dtype) for d in docs]
    halves = [with_eot[: len(with_eot) // 3], with_eot[len(with_eot) // 3:]]  # two input files
    for i, part in enumerate(halves):
        for split in SPLITS:
            mine = part if split == "train" else []
            offsets = np.concatenate([[0], np.cumsum([len(d) for d in mine])]).astype(np.int64)
            values = np.concatenate(mine) if mine else np.empty(0, dtype)
            batch = pa.record_batch([pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))],
                                    schema=encoded_schema(dtype))
            with storage.atomic_local_file(lay.encoded(i, split)) as tmp, pa.OSFile(str(tmp), "wb") as f, \
                    pa.ipc.new_file(f, batch.schema) as w:
                w.write_batch(batch)
    tokens = {s: [sum(len(d) for d in h) if s == "train" else 0 for h in halves] for s in SPLITS}
    plans = {s: SplitPlan(s, [lay.encoded(i, s) for i in range(2)], tokens[s], SEQ_LEN, ROWS_PER_SHARD,
                          dtype, IDS["pad"]) for s in SPLITS}
    packed = {(s, k): pack_shard(plans[s], k, str(out)) for s in SPLITS for k in range(plans[s].shards)}
    cfg = TokenizeConfig(input="unused", tokenizer={"path": "unused"}, seq_len=SEQ_LEN,
                         rows_per_shard=ROWS_PER_SHARD)
    info = {"dtype": dtype, "vocab_size": vocab, "sha256": "0" * 64, "special_token_ids": IDS}
    enc = [{"docs": {"train": len(h), "val": 0}} for h in halves]
    storage.write_json(lay.manifest, build_manifest(cfg, info, plans, enc, packed))
    return np.concatenate(with_eot).astype(np.int64)


def _reference(stream: np.ndarray, row: int) -> dict[str, np.ndarray]:
    """What the batch contract says row ``row`` must give, computed naively from the stream."""
    T = SEQ_LEN
    a = row * T
    window = stream[a: a + T + 1]
    inp = np.full(T, IDS["pad"])
    inp[: min(T, len(window))] = window[:T]
    labels = np.full(T, -100)
    labels[: len(window) - 1] = window[1:]
    is_start = np.array([a + t < len(stream) and (a + t == 0 or stream[a + t - 1] == IDS["eot"])
                         for t in range(T)])  # padding starts no document
    pos, seg = np.zeros(T, np.int64), np.zeros(T, np.int64)
    for t in range(1, T):
        pos[t] = 0 if is_start[t] else pos[t - 1] + 1
        seg[t] = seg[t - 1] + is_start[t]
    return {"input_ids": inp, "labels": labels, "position_ids": pos, "doc_mask": seg}


def _docs(rng: np.random.Generator, n: int, vocab: int) -> list[np.ndarray]:
    lengths = np.concatenate([rng.integers(1, 12, n - 2), [40, 3]])  # one spans several rows
    return [rng.integers(4, vocab, int(k)) for k in rng.permutation(lengths)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    stream = _write_packed(out, _docs(np.random.default_rng(0), 60, 500), "uint16", 500)
    return {"out": out, "stream": stream, "ds": PackedDataset(out, "train")}


@pytest.mark.parametrize("dtype,vocab", [("uint16", 500), ("uint32", 70_000)])
def test_batches_follow_the_batch_contract(tmp_path, dtype, vocab):
    stream = _write_packed(tmp_path, _docs(np.random.default_rng(1), 50, vocab), dtype, vocab)
    ds = PackedDataset(tmp_path / "train")  # a split directory works too
    assert len(ds) == -(-(len(stream) - 1) // SEQ_LEN) and ds.split == "train"
    idx = np.arange(len(ds))[::-1]
    batch = ds.batch(idx, doc_mask=True)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == {
        k: (torch.int64, (len(ds), SEQ_LEN)) for k in ("input_ids", "labels", "position_ids", "doc_mask")}
    for j, i in enumerate(idx):
        want = _reference(stream, int(i))
        for k, v in want.items():
            assert np.array_equal(batch[k][j].numpy(), v), (k, i)
    assert (batch["labels"] == -100).any()  # the padded last row
    assert "doc_mask" not in ds.batch([0])


def test_shards_are_memory_mapped_not_copied(packed):
    ds = packed["ds"]
    tokens, length, starts = ds.row(ROWS_PER_SHARD + 2)  # shard 1, row 2
    assert ds.locate(ROWS_PER_SHARD + 2) == (1, 2)
    assert not tokens.flags.owndata and not tokens.flags.writeable  # a view of the read-only mapping
    assert length == SEQ_LEN + 1 and np.array_equal(tokens, packed["stream"][(ROWS_PER_SHARD + 2) * SEQ_LEN:][
        : SEQ_LEN + 1])
    assert all(tokens[s - 1] == IDS["eot"] for s in starts if s > 0)


def _sample_ids(ds: PackedDataset) -> dict[bytes, int]:
    return {ds.row(i)[0][:-1].astype(np.int64).tobytes(): i for i in range(len(ds))}


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_exactly_once_per_epoch_across_ranks(packed, world_size):
    ds = packed["ds"]
    ids = _sample_ids(ds)
    assert len(ids) == len(ds)  # rows are distinct, so content identifies the sample
    loaders = [Loader(ds, 4, rank=r, world_size=world_size, seed=7, drop_last=False)
               for r in range(world_size)]
    orders = []
    for _epoch in range(2):
        seen = []
        for _ in range(loaders[0].steps_per_epoch):
            for ld in loaders:
                seen += [ids[row.numpy().tobytes()] for row in next(ld)["input_ids"]]
        assert sorted(seen) == list(range(len(ds)))
        orders.append(seen)
    assert orders[0] != orders[1]  # a new permutation each epoch
    # drop_last: full batches only, no sample twice in an epoch.
    loaders = [Loader(ds, 4, rank=r, world_size=world_size, seed=7) for r in range(world_size)]
    seen = [ids[row.numpy().tobytes()] for _ in range(loaders[0].steps_per_epoch) for ld in loaders
            for row in next(ld)["input_ids"]]
    g = 4 * world_size
    assert len(seen) == len(set(seen)) == loaders[0].steps_per_epoch * g > len(ds) - g


def _take(loader: Loader, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def test_resume_continues_with_the_exact_next_samples(packed):
    ds = packed["ds"]
    kw = {"batch_size": 3, "world_size": 2, "seed": 11, "doc_mask": True}
    ref = [Loader(ds, rank=r, **kw) for r in range(2)]
    steps = ref[0].steps_per_epoch
    for ld in ref:
        _take(ld, steps + 2)  # into the second epoch
    state = json.loads(json.dumps(ref[0].state_dict()))
    assert state["epoch"] == 1 and state == ref[1].state_dict()
    expected = [_take(ld, steps) for ld in ref]  # crosses into the third epoch
    for r in range(2):
        resumed = Loader(ds, rank=r, **kw)
        resumed.load_state_dict(state)
        for got, want in zip(_take(resumed, steps), expected[r], strict=True):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    # Another data-parallel layout with the same global batch continues with the same samples.
    one = Loader(ds, batch_size=6, world_size=1, seed=11, doc_mask=True)
    one.load_state_dict(state)
    got = next(one)["input_ids"]
    assert torch.equal(got, torch.cat([expected[0][0]["input_ids"], expected[1][0]["input_ids"]]))
    with pytest.raises(ValueError, match="seed"):
        Loader(ds, batch_size=3, seed=12).load_state_dict(state)


def test_validation_pass_is_ordered_and_complete(packed):
    ds = packed["ds"]
    loader = Loader(ds, batch_size=5, shuffle=False, drop_last=False)
    for _ in range(2):  # each call is one full pass
        rows = torch.cat([b["input_ids"] for b in loader.epoch_batches()])
        assert torch.equal(rows, ds.batch(np.arange(len(ds)))["input_ids"])
    ranks = [Loader(ds, 5, rank=r, world_size=2, shuffle=False, drop_last=False) for r in range(2)]
    counts = [sum(len(b["input_ids"]) for b in ld.epoch_batches()) for ld in ranks]
    assert sum(counts) == len(ds) and abs(counts[0] - counts[1]) <= 1


def test_corrupt_shard_and_bad_arguments_are_reported(packed, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    (out / "manifest.json").write_bytes((packed["out"] / "manifest.json").read_bytes())
    (out / "train").mkdir()
    for p in (packed["out"] / "train").glob("*.arrow"):
        (out / "train" / p.name).write_bytes(p.read_bytes())
    data = bytearray((out / "train" / "part-00001.arrow").read_bytes())
    data[200] ^= 0xFF
    (out / "train" / "part-00001.arrow").write_bytes(bytes(data))
    assert len(PackedDataset(out)) == len(packed["ds"])  # not verified: opens
    with pytest.raises(ValueError, match="sha256"):
        PackedDataset(out, verify=True)
    with pytest.raises(ValueError, match="no split"):
        PackedDataset(out, "test")
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        Loader(packed["ds"], batch_size=len(packed["ds"]) + 1)
    with pytest.raises(IndexError):
        packed["ds"].batch([len(packed["ds"])])


def test_resharding_two_ranks_to_one_skips_and_repeats_no_sample(packed):
    """2 ranks x micro-batch 3 for half an epoch, then (state saved) 1 rank x micro-batch 3 x 2 accumulation
    steps, the same global batch of 6: every sample of the epoch is seen exactly once, in the same order
    as an uninterrupted 2-rank run."""
    ds = packed["ds"]
    two = [Loader(ds, 3, rank=r, world_size=2, seed=5) for r in range(2)]
    seen: list[int] = []
    steps = two[0].steps_per_epoch
    half = steps // 2
    assert half >= 1
    for _ in range(half):
        for ld in two:
            seen += ld.next_indices().tolist()
    state = json.loads(json.dumps(two[0].state_dict()))
    one = Loader(ds, 3, rank=0, world_size=1, seed=5)
    one.load_state_dict(state)
    for _ in range(half, steps):
        for _accum in range(2):
            seen += one.next_indices().tolist()
    assert len(seen) == len(set(seen)) == steps * 6  # none twice, none skipped (drop_last remainder aside)
    assert seen == one.order(0)[: steps * 6].tolist()


def _step_rows(loaders: list[Loader], accum: int, steps: int) -> list[list[int]]:
    """Row indices of each optimizer step: every rank's ``accum`` micro-batches, in order."""
    out = []
    for _ in range(steps):
        rows: list[int] = []
        for _ in range(accum):
            for ld in loaders:
                rows += ld.next_indices().tolist()
        out.append(sorted(rows))
    return out


def test_an_optimizer_step_takes_the_same_rows_at_any_worker_count_across_epochs(packed):
    ds = packed["ds"]
    assert len(ds) % 8  # epochs leave rows over, so an epoch end falls inside a micro-batch sequence
    steps = 3 * (len(ds) // 8) + 2  # three epoch boundaries
    two = _step_rows([Loader(ds, 2, rank=r, world_size=2, seed=5, accum=2) for r in range(2)], 2, steps)
    one = _step_rows([Loader(ds, 2, world_size=1, seed=5, accum=4)], 4, steps)
    four = _step_rows([Loader(ds, 2, rank=r, world_size=4, seed=5) for r in range(4)], 1, steps)
    assert two == one == four
    assert all(len(s) == len(set(s)) == 8 for s in two)
    # resharding mid-epoch: 2 workers for 3 steps, then 1 worker from their saved position
    first = [Loader(ds, 2, rank=r, world_size=2, seed=5, accum=2) for r in range(2)]
    head = _step_rows(first, 2, 3)
    rest = Loader(ds, 2, world_size=1, seed=5, accum=4)
    rest.load_state_dict(first[0].state_dict())
    assert head + _step_rows([rest], 4, steps - 3) == two


def test_an_optimizer_step_larger_than_the_data_is_refused(packed):
    ds = packed["ds"]
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        Loader(ds, 2, world_size=2, accum=len(ds))
