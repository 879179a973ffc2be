"""The weighted mixture loader on packed shards written by the tokenize stage's own pack step: proportions,
the rows of every step at any world size, exact resume, repeat and stop when a source runs out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data_loader import _write_packed

from stages.lm.data import PackedDataset
from stages.lm.mixture import BLOCK, MixtureLoader, MixturePlan, SourceExhausted, quotas


def _source(tmp_path, name: str, docs: int, seed: int) -> PackedDataset:
    rng = np.random.default_rng(seed)
    _write_packed(tmp_path / name, [rng.integers(4, 50, rng.integers(5, 40)) for _ in range(docs)],
                  "uint16", 64)
    return PackedDataset(tmp_path / name, "train")


@pytest.fixture()
def sources(tmp_path) -> dict[str, PackedDataset]:
    return {"web": _source(tmp_path, "web", 120, 1), "code": _source(tmp_path, "code", 30, 2)}


def _steps(sources, weights, world: int, accum: int, steps: int, micro: int = 2, start=None, **kw):
    """``[step -> sorted (source, row) pairs]`` of ``steps`` optimizer steps taken by ``world`` ranks."""
    loaders = [MixtureLoader(sources, weights, micro, r, world, seed=5, accum=accum, **kw)
               for r in range(world)]
    if start:
        for ld in loaders:
            ld.load_state_dict(start)
    out = []
    for _ in range(steps):
        rows = []
        for _ in range(accum):
            for ld in loaders:
                src, r = ld.next_rows()
                rows += list(zip(src.tolist(), r.tolist(), strict=True))
        out.append(sorted(rows))
    return out, loaders[0]


def test_quotas_are_exact_per_block_and_keep_tiny_weights():
    assert quotas([0.7, 0.2, 0.1]).tolist() == [5735, 1638, 819]  # 5734.4, 1638.4, 819.2
    assert quotas([0.7, 0.2, 0.1]).sum() == BLOCK
    q = quotas([1.0, 1e-9])
    assert q.tolist() == [BLOCK - 1, 1]


def test_proportions_over_a_long_run_match_the_weights():
    plan = MixturePlan(["a", "b", "c"], [0.5, 0.3, 0.2], [1000, 1000, 1000], seed=0)
    src, _ = plan.positions(0, 100_000)
    share = np.bincount(src, minlength=3) / len(src)
    assert np.abs(share - [0.5, 0.3, 0.2]).max() < 1e-3
    # within a block the order is shuffled, not runs of one source
    first = src[:200]
    assert len(set(first[:20].tolist())) > 1 and np.bincount(first, minlength=3).min() > 10
    assert plan.taken(100_000).tolist() == np.bincount(src, minlength=3).tolist()


def test_a_step_takes_the_same_rows_at_any_world_size(sources):
    weights = {"web": 0.7, "code": 0.3}
    one, _ = _steps(sources, weights, world=1, accum=4, steps=6)
    two, _ = _steps(sources, weights, world=2, accum=2, steps=6)
    four, _ = _steps(sources, weights, world=4, accum=1, steps=6)
    assert one == two == four


def test_resume_at_another_world_size_continues_exactly(sources):
    weights = {"web": 0.6, "code": 0.4}
    straight, _ = _steps(sources, weights, world=2, accum=1, steps=12)
    first, loader = _steps(sources, weights, world=2, accum=1, steps=5)
    state = loader.state_dict()
    rest, _ = _steps(sources, weights, world=1, accum=2, steps=7, start=state)
    assert first + rest == straight


def test_a_source_that_runs_out_repeats_in_new_epochs(sources):
    weights = {"web": 0.2, "code": 0.8}
    code_rows = len(sources["code"])
    steps, loader = _steps(sources, weights, world=2, accum=1, steps=40)
    taken = [r for step in steps for s, r in step if s == 1]
    # the code source's stream: whole epochs, each a permutation of its rows
    assert len(taken) > 2 * code_rows
    plan = loader.plan
    stream = [plan.row(1, p) for p in range(2 * code_rows)]
    assert sorted(stream[:code_rows]) == sorted(stream[code_rows:]) == list(range(code_rows))
    assert stream[:code_rows] != stream[code_rows:]
    m = loader.metrics()
    assert m["epochs/code"] > 2 and m["tokens/web"] + m["tokens/code"] == loader.consumed * 16


def test_stop_ends_every_rank_before_the_step_that_would_run_out(sources):
    weights = {"web": 0.2, "code": 0.8}
    loaders = [MixtureLoader(sources, weights, 2, r, 2, seed=5, accum=2, repeat=False) for r in range(2)]
    taken: list[list[tuple[int, int]]] = [[], []]
    for ld, mine in zip(loaders, taken, strict=True):
        with pytest.raises(SourceExhausted, match="'code' ran out of rows"):
            for _ in range(1000):
                src, rows = ld.next_rows()
                mine += list(zip(src.tolist(), rows.tolist(), strict=True))
    # whole steps (2 ranks x accumulation 2), the same on both ranks
    assert len(taken[0]) == len(taken[1]) and len(taken[0]) % 4 == 0
    code = [r for rank in taken for s, r in rank if s == 1]
    assert len(code) == len(set(code)) and len(code) > len(sources["code"]) - 8  # none twice, < a step left


def test_batches_hold_the_rows_of_their_sources(sources):
    weights = {"web": 0.5, "code": 0.5}
    loader = MixtureLoader(sources, weights, 4, 0, 1, seed=1)
    twin = MixtureLoader(sources, weights, 4, 0, 1, seed=1)
    for _ in range(5):
        batch = next(loader)
        src, rows = twin.next_rows()
        names = list(sources)
        for j, (s, r) in enumerate(zip(src, rows, strict=True)):
            want = sources[names[s]].batch([r])
            for key in ("input_ids", "labels", "position_ids"):
                assert torch.equal(batch[key][j], want[key][0]), key


def test_resuming_another_mixture_is_refused(sources):
    _, loader = _steps(sources, {"web": 0.5, "code": 0.5}, world=1, accum=1, steps=2)
    other = MixtureLoader(sources, {"web": 0.9, "code": 0.1}, 2, 0, 1, seed=5)
    with pytest.raises(ValueError, match="quota"):
        other.load_state_dict(loader.state_dict())
