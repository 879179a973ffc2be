"""Preference data: formats, quarantine with reasons, completion masks, truncation, splits, loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_records, write_jsonl
from tokenizers import Tokenizer

from stages.dpo.data import PAD_MULTIPLE, PairData, PairLoader, val_batches
from stages.dpo.prepare import DataSpec, prepare
from stages.sft.chat import ChatEncoder, to_messages

PAD = 1


@pytest.fixture(scope="module")
def tok(dpo_assets) -> Tokenizer:
    return Tokenizer.from_file(f"{dpo_assets.tokenizer_dir}/tokenizer.json")


def _prepare(tmp_path, tok, train, val=None, val_fraction=0.0, max_len=128, max_prompt_len=64):
    spec = DataSpec(str(write_jsonl(tmp_path / "train.jsonl", train)),
                    None if val is None else str(write_jsonl(tmp_path / "val.jsonl", val)),
                    val_fraction, max_len, max_prompt_len)
    summary = prepare(spec, tok.to_str(), str(tmp_path / "out"))
    pairs = tmp_path / "out" / "pairs"
    load = {s: PairData.load(str(pairs / f"{s}.arrow"), max_len, PAD) for s in ("train", "val")}
    return summary, load


def _scored_text(tok, data, side, i):
    ids, scored = data.sequence(side, i)
    return tok.decode(ids.tolist(), skip_special_tokens=False), tok.decode(ids[scored].tolist(),
                                                                           skip_special_tokens=False)


def test_both_formats_score_only_the_completion_and_match_the_sft_encoding(tmp_path, tok):
    recs = [
        {"prompt": "What does `json.dumps` do?", "chosen": "Serialize obj.", "rejected": "Open a file."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "And `os.path`?"}],
         "chosen": [{"role": "assistant", "content": "Path helpers."}],
         "rejected": [{"role": "assistant", "content": "A socket."}]},
    ]
    _, data = _prepare(tmp_path, tok, recs, val=recs[:1])
    train = data["train"]
    assert _scored_text(tok, train, "chosen", 0) == (
        "<|im_start|>user\nWhat does `json.dumps` do?<|im_end|>\n<|im_start|>assistant\nSerialize obj."
        "<|im_end|>\n", "Serialize obj.<|im_end|>")
    assert _scored_text(tok, train, "rejected", 0)[1] == "Open a file.<|im_end|>"
    full, scored = _scored_text(tok, train, "chosen", 1)
    assert scored == "Path helpers.<|im_end|>"  # the prompt's own assistant turn is not scored
    assert full.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    encoder = ChatEncoder(tok)  # same ids as the sft stage trains on
    for i, rec in enumerate(recs):
        for side in ("chosen", "rejected"):
            ids, _ = encoder.encode(to_messages({"prompt": rec["prompt"], "completion": rec[side]}))
            assert train.sequence(side, i)[0].tolist() == ids.tolist()


def test_bad_records_are_quarantined_with_reasons(tmp_path, tok):
    good = make_records(4, seed=5)
    msg = [{"role": "assistant", "content": "x"}]
    bad = [
        "{not json",
        json.dumps([1, 2]),
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "chosen": 3, "rejected": "b"},
        {"prompt": "q", "chosen": msg, "rejected": "b"},
        {"prompt": [{"role": "robot", "content": "q"}], "chosen": msg, "rejected": msg},
        {"prompt": "q", "chosen": "a <|im_end|> b", "rejected": "c"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "a", "rejected": "   "},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
         "rejected": msg},
    ]
    summary, data = _prepare(tmp_path, tok, good[:2] + bad + good[2:], val=good[:1])
    assert len(data["train"]) == 4 and summary["train"]["pairs"] == 4
    assert summary["train"]["records"] == 14 and summary["train"]["quarantined"] == 10
    lines = (tmp_path / "out" / "rejects" / "train.jsonl").read_text().splitlines()
    rejects = [json.loads(line) for line in lines]
    assert [r["line"] for r in rejects] == list(range(3, 13))
    reasons = [r["reason"] for r in rejects]
    mixed = "chosen: prompt and completion must both be strings or both be message lists"
    for i, part in enumerate(["invalid JSON", "not a JSON object", "missing field 'rejected'", mixed, mixed,
                              "chosen: prompt[0].role is 'robot'",
                              "chosen: prompt/completion[1].content contains the control token <|im_end|>",
                              "chosen and rejected are identical", "rejected: empty completion",
                              "chosen: completion messages must all have role"]):
        assert part in reasons[i], (i, reasons[i])
    assert all(r["file"].endswith("train.jsonl") and r["snippet"] for r in rejects)


def test_long_prompts_keep_their_end_and_long_completions_their_start(tmp_path, tok):
    long_prompt = "What does " + " ".join(f"w{i}" for i in range(80)) + " do?"
    recs = [{"prompt": long_prompt, "chosen": "Short answer.", "rejected": "Other answer."},
            {"prompt": "q?", "chosen": " ".join(["word"] * 200), "rejected": "No."}]
    summary, data = _prepare(tmp_path, tok, recs, val=recs[:1], max_len=64, max_prompt_len=24)
    assert summary["train"]["truncated_prompts"] == 1 and summary["train"]["truncated_completions"] == 1
    ids, scored = data["train"].sequence("chosen", 0)
    first = int(np.argmax(scored))
    assert first == 24  # prompt cut to its last 24 tokens
    assert tok.decode(ids[first:].tolist(), skip_special_tokens=False) == "Short answer.<|im_end|>\n"
    assert tok.decode(ids[:first].tolist(), skip_special_tokens=False).endswith("do?<|im_end|>\n"
                                                                               "<|im_start|>assistant\n")
    ids, scored = data["train"].sequence("chosen", 1)
    assert len(ids) == 64 and scored[-1] and scored.sum() == 64 - int(np.argmax(scored))


def test_val_fraction_split_is_by_content_and_disjoint(tmp_path, tok):
    recs = make_records(60, seed=7)
    summary, data = _prepare(tmp_path, tok, recs, val_fraction=0.25)
    ids = {s: set(data[s].ids) for s in data}
    assert ids["train"].isdisjoint(ids["val"]) and len(ids["train"] | ids["val"]) == 60
    assert 5 <= len(ids["val"]) <= 25
    assert summary["train"]["records"] + summary["val"]["records"] == 60
    # Reordering the file keeps every pair on its side.
    _, again = _prepare(tmp_path / "b", tok, recs[::-1], val_fraction=0.25)
    assert {i.split(":")[1] for i in again["val"].ids} == {str(61 - int(i.split(":")[1])) for i in ids["val"]}


def test_batches_loader_resume_and_val_split(tmp_path, tok):
    _, data = _prepare(tmp_path, tok, make_records(22, seed=8), val=make_records(7, seed=9))
    train = data["train"]
    b = train.batch([3, 5])
    # Padded to the batch's longest sequence rounded up to 32, not to max_len (128).
    longest = max(len(train.sequence(s, i)[0]) for s in ("chosen", "rejected") for i in (3, 5))
    T = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    assert longest <= T < longest + PAD_MULTIPLE and T < 128
    assert b["input_ids"].shape == (4, T) and b["labels"].shape == (4, T)
    assert b["position_ids"].shape == (4, T)
    for r, (side, i) in enumerate([("chosen", 3), ("chosen", 5), ("rejected", 3), ("rejected", 5)]):
        ids, scored = train.sequence(side, i)
        n = len(ids)
        assert b["input_ids"][r, :n].tolist() == ids.tolist() and (b["input_ids"][r, n:] == PAD).all()
        want = [int(ids[t + 1]) if scored[t + 1] else -100 for t in range(n - 1)] + [-100] * (T - n + 1)
        assert b["labels"][r].tolist() == want

    loaders = [PairLoader(train, 3, rank=r, world_size=2, seed=4) for r in range(2)]
    seen = [[next(ld)["pair_index"].tolist() for _ in range(7)] for ld in loaders]
    for step in range(3):  # 22 pairs, global batch 6: 3 steps per epoch, ranks disjoint
        assert set(seen[0][step]).isdisjoint(seen[1][step])
    epoch0 = sorted(i for s in range(3) for r in range(2) for i in seen[r][s])
    assert len(set(epoch0)) == 18
    resumed = PairLoader(train, 3, rank=1, world_size=2, seed=4)
    probe = PairLoader(train, 3, rank=1, world_size=2, seed=4)
    for _ in range(4):
        next(probe)
    resumed.load_state_dict(json.loads(json.dumps(probe.state_dict())))
    assert [next(resumed)["pair_index"].tolist() for _ in range(3)] == seen[1][4:7]

    val = data["val"]
    per_rank = [val_batches(val, r, 2, 2) for r in range(2)]  # 7 pairs: 3 per rank, 1 left out
    assert [[len(x["pair_index"]) for x in p] for p in per_rank] == [[2, 1], [2, 1]]
    assert [i for p in per_rank for x in p for i in x["pair_index"].tolist()] == [0, 1, 2, 3, 4, 5]
    assert len(val_batches(val, 0, 2, 2, limit=1)) == 1


def test_padding_follows_the_batch_and_log_probs_do_not_depend_on_it(tmp_path, tok, dpo_assets):
    """Each row's summed log-prob is bitwise the same alone, in a short batch or in a long one (widths
    differ): the reference pass and training batch pairs differently and must agree exactly."""
    import torch

    from stages.dpo.reference import pair_logps
    from stages.lm.hf import import_hf

    recs = make_records(16, seed=5)
    recs[0]["chosen"] = " ".join([recs[0]["chosen"]] * 12)  # one long pair: a wide batch
    _, data = _prepare(tmp_path, tok, recs, max_len=256, max_prompt_len=64)
    train = data["train"]
    lengths = [len(train.sequence(s, i)[0]) for i in range(len(train)) for s in ("chosen", "rejected")]
    assert max(lengths) > 3 * np.mean(lengths)
    model = import_hf(dpo_assets.model_dir).eval()

    def logps(idx: list[int]) -> dict[tuple[str, int], float]:
        batch = train.batch(idx)
        with torch.no_grad():
            lp = pair_logps(model, batch).tolist()
        B = len(idx)
        return {**{("chosen", i): lp[b] for b, i in enumerate(idx)},
                **{("rejected", i): lp[B + b] for b, i in enumerate(idx)}}

    widths = set()
    alone: dict[tuple[str, int], float] = {}
    for i in range(len(train)):
        widths.add(train.width([i]))
        alone.update(logps([i]))
    for idx in ([0, 1, 2], [3, 4, 5, 6, 7], [8, 0], [9, 10, 11, 12, 13, 14, 15], [15, 1]):
        widths.add(train.width(idx))
        assert logps(idx) == {k: alone[k] for k in logps(idx)}
    assert len(widths) >= 3 and max(widths) <= 256
