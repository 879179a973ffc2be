"""The DPO task and the reference pass on a real tiny model (no Ray): step 0, both reference modes,
agreement with an independent per-sequence computation, gradients, resumable reference pass."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from stages.dpo.loss import dpo_loss
from stages.dpo.prepare import DataSpec, prepare
from stages.dpo.reference import ReferenceJob, load_reference
from stages.dpo.task import DPOTask
from stages.lm.hf import import_hf
from stages.sft.chat import ChatEncoder, to_messages

MAX_LEN, PAD = 96, 1


@pytest.fixture(scope="module")
def prepared(dpo_assets, tmp_path_factory) -> Path:
    """Tokenized pairs and a finished reference pass (shards of 10 pairs, batches of 3)."""
    out = tmp_path_factory.mktemp("dpo-task")
    tok_json = Path(dpo_assets.tokenizer_dir, "tokenizer.json").read_text()
    summary = prepare(DataSpec(dpo_assets.train, dpo_assets.val, 0.0, MAX_LEN, 64), tok_json, str(out))
    assert summary["train"]["truncated_prompts"] == summary["train"]["truncated_completions"] == 0
    for split in ("train", "val"):
        ReferenceJob(dpo_assets.model_dir, str(out / "pairs" / f"{split}.arrow"),
                     str(out / "reference" / split), MAX_LEN, PAD, batch_size=3, shard_pairs=10).run()
    return out


def _task(dpo_assets, out: Path, reference: str, loss_type="sigmoid", beta=0.1, smoothing=0.0) -> DPOTask:
    return DPOTask(dpo_assets.model_dir, dpo_assets.tokenizer_dir, str(out), MAX_LEN, PAD, beta, loss_type,
                   smoothing, reference)


def _trained_policy(dpo_assets) -> torch.nn.Module:
    """The reference with perturbed weights: a policy some way into training."""
    model = import_hf(dpo_assets.model_dir)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def test_step_zero_sigmoid_loss_is_log2_and_rewards_are_zero(dpo_assets, prepared):
    log2 = torch.tensor(math.log(2), dtype=torch.float32).item()
    for reference in ("precompute", "in_memory"):
        task = _task(dpo_assets, prepared, reference)
        model = task.build_model()
        for idx in ([0, 1, 2, 3], [17, 5], [47]):
            loss, m = task.loss(model, task.data("train").batch(idx))
            assert loss.item() == log2, reference
            for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
                assert m[name].item() == 0.0, (reference, name)


def _independent_logps(model, tok: Tokenizer, record: dict, side: str) -> float:
    """Summed log-probs of one completion: the conversation alone (no padding, no batch), tokenized by
    the sft stage's encoder, scored token by token."""
    messages = to_messages({"prompt": record["prompt"], "completion": record[side]})
    ids, trained = ChatEncoder(tok).encode(messages)
    with torch.no_grad():
        logits = model(torch.tensor(ids[None], dtype=torch.long)).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if trained[t])


@pytest.mark.parametrize(("loss_type", "beta", "smoothing"), [("sigmoid", 0.3, 0.1), ("ipo", 0.1, 0.0)])
def test_modes_agree_exactly_and_match_an_independent_computation(dpo_assets, prepared, loss_type, beta,
                                                                  smoothing):
    import json

    policy = _trained_policy(dpo_assets)
    reference = import_hf(dpo_assets.model_dir)
    tok = Tokenizer.from_file(f"{dpo_assets.tokenizer_dir}/tokenizer.json")
    records = [json.loads(line) for line in Path(dpo_assets.train).read_text().splitlines()]
    pre, mem = (_task(dpo_assets, prepared, r, loss_type, beta, smoothing)
                for r in ("precompute", "in_memory"))
    for idx in ([0, 4, 9], [30, 2, 41, 19, 14]):
        lp, mp = pre.loss(policy, pre.data("train").batch(idx))
        lm, mm = mem.loss(policy, mem.data("train").batch(idx))
        assert lp.item() == lm.item()  # identical, not merely close
        assert all(mp[k].item() == mm[k].item() for k in mp)
        logps = {(m, s): torch.tensor([_independent_logps(model, tok, records[i], s) for i in idx])
                 for m, model in (("pi", policy), ("ref", reference)) for s in ("chosen", "rejected")}
        want, wm = dpo_loss(logps["pi", "chosen"], logps["pi", "rejected"], logps["ref", "chosen"],
                            logps["ref", "rejected"], beta, loss_type, smoothing)
        assert lp.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)
        for k in wm:
            assert mp[k].item() == pytest.approx(wm[k].item(), rel=1e-5, abs=1e-5), k


def test_prompt_and_padding_tokens_carry_no_gradient(dpo_assets, prepared):
    task = _task(dpo_assets, prepared, "precompute")
    policy = _trained_policy(dpo_assets)
    captured = {}

    def keep(_module, _inputs, out):
        out["logits"].retain_grad()
        captured["logits"] = out["logits"]

    policy.register_forward_hook(keep)
    batch = task.data("train").batch([1, 4, 7])
    loss, _ = task.loss(policy, batch)
    loss.backward()
    grad = captured["logits"].grad.abs().sum(-1)  # (2B, T)
    scored = batch["labels"] != -100
    assert (grad[~scored] == 0).all()  # positions predicting prompt tokens or padding: no gradient
    assert (grad[scored] > 0).all()
    assert scored.sum() > 0 and (~scored).sum() > scored.sum() // 4


def test_reference_pass_resumes_per_shard_to_identical_bytes(dpo_assets, prepared, tmp_path):
    ref_dir = prepared / "reference" / "train"
    before = {p.name: p.read_bytes() for p in ref_dir.iterdir()}
    assert sorted(n for n in before if n.endswith(".done")) == [f"part-{k:05d}.done" for k in range(5)]
    # A kill after shard 2's data but before its marker, and one before shard 3's data.
    (ref_dir / "part-00002.done").unlink()
    (ref_dir / "part-00003.done").unlink()
    (ref_dir / "part-00003.npy").unlink()
    job = ReferenceJob(dpo_assets.model_dir, str(prepared / "pairs" / "train.arrow"), str(ref_dir), MAX_LEN,
                       PAD, batch_size=3, shard_pairs=10)
    assert job.run() == 2
    assert {p.name: p.read_bytes() for p in ref_dir.iterdir()} == before
    assert job.run() == 0
    # Another batch size, and the shards dealt out to 3 jobs, give the same values (fixed-shape batches).
    other = ReferenceJob(dpo_assets.model_dir, job.pairs_path, str(tmp_path / "ref"), MAX_LEN, PAD,
                         batch_size=8, shard_pairs=10)
    assert [j.run() for j in other.split(3)] == [2, 2, 1]
    assert np.array_equal(load_reference(str(tmp_path / "ref"), 48), load_reference(str(ref_dir), 48))


def test_task_pickles_without_its_caches(dpo_assets, prepared):
    task = _task(dpo_assets, prepared, "in_memory")
    task.loss(task.build_model(), task.data("val").batch([0]))
    clone = pickle.loads(pickle.dumps(task))
    assert clone._data == {} and clone._ref_model is None and clone.beta == task.beta
