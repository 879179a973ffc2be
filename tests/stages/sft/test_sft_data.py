"""The sft data side with a real tokenizer and real transformers: rendering, loss masks, packing,
quarantine, the length policy and the loader."""

from __future__ import annotations

import gzip
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from sft_helpers import GENERATION_TEMPLATE, records, train_tokenizer, write_jsonl
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from stages.lm.data import Loader
from stages.lm.model import CausalLM, ModelConfig
from stages.sft.chat import ChatEncoder, to_messages
from stages.sft.data import IGNORE_INDEX, SFTDataset
from stages.sft.pack import best_fit_decreasing
from stages.sft.prepare import DataSpec, prepare
from stages.sft.tokenizer import prepare_tokenizer

TRICKY = [
    [{"role": "user", "content": "\n\nleading newlines "},
     {"role": "assistant", "content": "\n  indented é 日本\n"}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": " "},
     {"role": "assistant", "content": ""}, {"role": "user", "content": "again?"},
     {"role": "assistant", "content": " yes, again."}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    src = train_tokenizer(tmp_path_factory.mktemp("tok-src"))
    out = tmp_path_factory.mktemp("tok")
    prepare_tokenizer(str(src), str(out), logging.getLogger("t"))
    return out


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def encoder(tok_dir) -> ChatEncoder:
    return ChatEncoder(Tokenizer.from_file(str(tok_dir / "tokenizer.json")))


def _conversations() -> list[list[dict]]:
    return [to_messages(r) for r in records(40, seed=1)] + TRICKY


def _prepare(tmp_path: Path, tok_dir: Path, rows: list, packing: bool, max_len: int = 256,
             truncation: str = "truncate", val: list | None = None) -> tuple[dict, Path]:
    data = write_jsonl(tmp_path / "in" / "train.jsonl", rows)
    val_path = write_jsonl(tmp_path / "in" / "val.jsonl", val) if val is not None else None
    spec = DataSpec(str(data), str(val_path) if val_path else None, 0.0, max_len, packing, truncation)
    out = tmp_path / "out"
    summary = prepare(spec, (tok_dir / "tokenizer.json").read_text(), str(out))
    return summary, out


def test_rendering_matches_transformers_apply_chat_template(encoder, hf_tok):
    for conv in _conversations():
        ids, _ = encoder.encode(conv)
        assert ids.tolist() == hf_tok.apply_chat_template(conv)["input_ids"]


def test_loss_mask_is_assistant_content_and_end_of_turn_only(encoder, hf_tok):
    im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    for conv in _conversations():
        ids, mask = encoder.encode(conv)
        ref = hf_tok.apply_chat_template(conv, chat_template=GENERATION_TEMPLATE, return_dict=True,
                                         return_assistant_tokens_mask=True)
        assert ref["input_ids"] == ids.tolist()
        assert mask.astype(int).tolist() == ref["assistant_masks"]
        # the trained tokens spell exactly each assistant answer followed by <|im_end|>
        answers = "".join(m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant")
        assert hf_tok.decode(ids[mask].tolist()) == answers
        assert int((ids[mask] == im_end).sum()) == sum(m["role"] == "assistant" for m in conv)


def test_training_starts_right_after_the_generation_prompt(encoder, hf_tok):
    """What a user feeds at inference (the history + add_generation_prompt) is exactly the untrained
    prefix before the last answer: the first trained token is the first token the model must generate."""
    for conv in _conversations():
        if conv[-1]["role"] != "assistant":
            continue
        ids, mask = encoder.encode(conv)
        prompt = hf_tok.apply_chat_template(conv[:-1], add_generation_prompt=True)["input_ids"]
        assert ids[: len(prompt)].tolist() == prompt
        assert mask[len(prompt)] and not mask[len(prompt) - 1]


def test_val_fraction_holds_out_by_content(tmp_path, tok_dir):
    rows = records(120, seed=8)
    write_jsonl(tmp_path / "in" / "train.jsonl", rows)
    spec = DataSpec(str(tmp_path / "in" / "train.jsonl"), None, 0.25, 256, False, "truncate")
    tok_json = (tok_dir / "tokenizer.json").read_text()
    summary = prepare(spec, tok_json, str(tmp_path / "a"))
    assert 15 <= summary["val"]["examples"] <= 45
    assert summary["train"]["examples"] + summary["val"]["examples"] == len(rows)
    assert summary["train"]["records"] + summary["val"]["records"] == len(rows)
    ids = {s: {i for row in SFTDataset(str(tmp_path / "a" / "data" / f"{s}.arrow"), 256, 1).row_ids()
               for i in row} for s in ("train", "val")}
    assert not ids["train"] & ids["val"] and len(ids["train"] | ids["val"]) == len(rows)
    # the split follows the content, not the position: shuffled files hold out the same conversations
    random.Random(0).shuffle(rows)
    write_jsonl(tmp_path / "in" / "train.jsonl", rows)
    again = prepare(spec, tok_json, str(tmp_path / "b"))
    assert again["val"]["examples"] == summary["val"]["examples"]
    a = SFTDataset(str(tmp_path / "a" / "data" / "val.arrow"), 256, 1)
    b = SFTDataset(str(tmp_path / "b" / "data" / "val.arrow"), 256, 1)
    assert sorted(a.row(i)[0].tolist() for i in range(len(a))) == sorted(b.row(i)[0].tolist()
                                                                          for i in range(len(b)))


@pytest.mark.parametrize("packing", [False, True])
def test_batch_labels_with_and_without_packing(tmp_path, tok_dir, encoder, packing):
    convs = _conversations()
    summary, out = _prepare(tmp_path, tok_dir, [{"messages": c} for c in convs], packing)
    assert summary["train"]["examples"] == len(convs) and summary["train"]["quarantined"] == 0
    if packing:
        assert summary["train"]["rows"] < len(convs)
    ds = SFTDataset(str(out / "data" / "train.arrow"), 256, pad_id=1)
    batch = ds.batch(np.arange(len(ds)), doc_mask=packing)
    expected = {json.dumps(c): encoder.encode(c) for c in convs}
    seen = 0
    for j in range(len(ds)):
        inp, lab = batch["input_ids"][j].numpy(), batch["labels"][j].numpy()
        pos = batch["position_ids"][j].numpy()
        seg = batch["doc_mask"][j].numpy() if packing else np.zeros_like(inp)
        starts = [t for t in range(len(inp)) if pos[t] == 0]
        for a in starts:
            b = a + 1
            while b < len(inp) and pos[b] == pos[b - 1] + 1 and seg[b] == seg[a]:
                b += 1
            if inp[a] == 1 and (lab[a:b] == IGNORE_INDEX).all():  # padding
                continue
            ids = inp[a:b]
            match = [k for k, (e, _) in expected.items() if np.array_equal(e, ids)]
            assert match, "a row segment is not one whole example"
            e_ids, e_mask = expected.pop(match[0])
            want = np.where(e_mask[1:], e_ids[1:], IGNORE_INDEX)
            assert np.array_equal(lab[a:b - 1], want)  # aligned: label t is token t + 1 where trained
            assert lab[b - 1] == IGNORE_INDEX  # nothing crosses into the next example
            seen += 1
    assert seen == len(convs) and not expected


def test_packed_examples_do_not_attend_to_each_other(tmp_path, tok_dir, encoder):
    convs = _conversations()[:12]
    _, out = _prepare(tmp_path, tok_dir, [{"messages": c} for c in convs], packing=True)
    ds = SFTDataset(str(out / "data" / "train.arrow"), 256, pad_id=1)
    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                 ffn_dim=128, max_seq_len=256)).eval()
    packed = ds.batch(np.arange(len(ds)), doc_mask=True)
    assert max(len(ds.row(i)[2]) for i in range(len(ds))) > 1  # some rows hold several examples
    _, out2 = _prepare(tmp_path / "u", tok_dir, [{"messages": c} for c in convs], packing=False)
    unpacked = SFTDataset(str(out2 / "data" / "train.arrow"), 256, pad_id=1)
    with torch.no_grad():
        logits = model(packed["input_ids"], packed["position_ids"], packed["doc_mask"]).logits
        for j in range(len(ds)):
            tokens, _, lengths = ds.row(j)
            a = 0
            for n in lengths:
                alone = torch.from_numpy(tokens[a:a + n].astype(np.int64))[None]
                torch.testing.assert_close(logits[j, a:a + n], model(alone).logits[0], atol=1e-5, rtol=1e-5)
                a += n
        # and the loss over the same examples is the same packed or one per row
        one_per_row = unpacked.batch(np.arange(len(unpacked)))
        torch.testing.assert_close(model(**packed).loss, model(**one_per_row).loss, atol=1e-5, rtol=1e-5)


def test_saved_template_reproduces_training_tokens(tmp_path, tok_dir, hf_tok):
    convs = _conversations()
    _, out = _prepare(tmp_path, tok_dir, [{"messages": c} for c in convs], packing=False)
    ds = SFTDataset(str(out / "data" / "train.arrow"), 256, pad_id=1)
    rows = {tuple(ds.row(i)[0].tolist()) for i in range(len(ds))}
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and "<|im_start|>" in cfg["chat_template"]
    assert rows == {tuple(hf_tok.apply_chat_template(c)["input_ids"]) for c in convs}


def test_prompt_completion_forms():
    assert to_messages({"prompt": "Q?", "completion": "A."}) == [
        {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    conv = to_messages({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                        "completion": [{"role": "assistant", "content": "a"}]})
    assert [m["role"] for m in conv] == ["system", "user", "assistant"]


def test_malformed_records_are_quarantined_with_reasons(tmp_path, tok_dir):
    good = records(6, seed=3)
    bad = [
        "{not json",
        "[1, 2]",
        {"text": "no chat fields"},
        {"messages": []},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a<|im_end|>b"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "prompt": "q"},
        {"prompt": "q", "completion": ""},
        {"prompt": "q"},
        {"prompt": [{"role": "user", "content": "q"}], "completion": "a"},
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
    ]
    rows = good[:3] + bad + good[3:]
    # the val file is gzipped and holds a bad line too: quarantine works for every input format
    val_path = tmp_path / "in" / "val.jsonl.gz"
    val_path.parent.mkdir(parents=True)
    val_path.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in records(3, seed=4)) + "\n\xff\n")
                                       .encode("latin-1")))
    data = write_jsonl(tmp_path / "in" / "train.jsonl", rows)
    spec = DataSpec(str(data), str(val_path), 0.0, 256, True, "truncate")
    summary = prepare(spec, (tok_dir / "tokenizer.json").read_text(), str(tmp_path / "out"))
    assert summary["train"]["records"] == len(rows)
    assert summary["train"]["examples"] == len(good)
    assert summary["train"]["quarantined"] == len(bad)
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects" / "train.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == list(range(4, 4 + len(bad)))
    reasons = " | ".join(r["reason"] for r in rejects)
    for fragment in ("invalid JSON", "not a JSON object", "neither 'messages' nor", "non-empty list",
                     "role is 'robot'", "content is int", "no assistant message", "control token <|im_end|>",
                     "both 'messages' and", "empty completion", "missing completion", "both be strings or",
                     "must all have role 'assistant'"):
        assert fragment in reasons, fragment
    assert all(r["snippet"] for r in rejects)
    assert summary["val"]["examples"] == 3 and summary["val"]["quarantined"] == 1
    val_rejects = (tmp_path / "out" / "rejects" / "val.jsonl").read_text()
    assert "invalid UTF-8" in val_rejects


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_length_policy_is_applied_and_counted(tmp_path, tok_dir, encoder, policy):
    long = {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "value " * 80}]}
    long_prompt = {"messages": [{"role": "user", "content": "key " * 80},
                                {"role": "assistant", "content": "a"}]}
    max_len = 64
    short = [r for r in records(20, seed=5) if len(encoder.encode(to_messages(r))[0]) <= max_len][:5]
    assert len(encoder.encode(to_messages(long))[0]) > max_len
    summary, out = _prepare(tmp_path, tok_dir, [long, long_prompt, *short], packing=True, max_len=max_len,
                            truncation=policy)
    s = summary["train"]
    assert s["dropped_no_target"] == (1 if policy == "truncate" else 0)  # the answer starts after max_len
    assert s["dropped_too_long"] == (2 if policy == "drop" else 0)
    assert s["truncated"] == (1 if policy == "truncate" else 0)  # the long answer, cut
    assert s["examples"] == len(short) + (1 if policy == "truncate" else 0)
    ds = SFTDataset(str(out / "data" / "train.arrow"), max_len, pad_id=1)
    assert max(len(ds.row(i)[0]) for i in range(len(ds))) <= max_len
    dropped = (out / "rejects" / "train.jsonl").read_text()
    assert dropped.count("train.jsonl:") == (1 if policy == "truncate" else 2)


def _naive_bfd(lengths: list[int], cap: int) -> list[list[int]]:
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [(free[r], -r) for r in range(len(rows)) if free[r] >= lengths[i]]
        if not fits:
            rows.append([i])
            free.append(cap - lengths[i])
        else:
            r = -min(fits)[1]
            rows[r].append(i)
            free[r] -= lengths[i]
    return rows


def test_best_fit_decreasing_packs_every_example_once_within_capacity():
    rng = random.Random(0)
    for cap in (7, 64, 300):
        lengths = [rng.randint(1, cap) for _ in range(500)] + [cap, 1, 1]
        rows = best_fit_decreasing(lengths, cap)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in r) <= cap for r in rows)
        # rows with equal free space are interchangeable for best fit, so a plain O(n^2) best fit ends
        # with the same multiset of row fills (only which equal row took an item may differ)
        def fills(rs, lengths=lengths):
            return sorted(sum(lengths[i] for i in r) for r in rs)
        assert fills(rows) == fills(_naive_bfd(lengths, cap))
        assert len(rows) <= -(-sum(lengths) // cap) * 11 // 9 + 1  # BFD's bound: <= 11/9 OPT + 1
    with pytest.raises(ValueError, match="length 0"):
        best_fit_decreasing([3, 0], 5)


def test_loader_is_deterministic_and_resumes_exactly(tmp_path, tok_dir):
    _, out = _prepare(tmp_path, tok_dir, records(80, seed=6), packing=False)
    ds = SFTDataset(str(out / "data" / "train.arrow"), 256, pad_id=1)

    def take(loader, n):
        return [next(loader)["input_ids"] for _ in range(n)]

    a, b = Loader(ds, 4, seed=7), Loader(ds, 4, seed=7)
    first = take(a, 30)  # crosses an epoch boundary (80 rows / 4)
    assert all(torch.equal(x, y) for x, y in zip(first, take(b, 30), strict=True))
    c = Loader(ds, 4, seed=7)
    take(c, 13)
    d = Loader(ds, 4, seed=7)
    d.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert all(torch.equal(x, y) for x, y in zip(take(c, 12), take(d, 12), strict=True))
    # two ranks see disjoint rows of each global batch
    r0, r1 = Loader(ds, 2, rank=0, world_size=2, seed=7), Loader(ds, 2, rank=1, world_size=2, seed=7)
    i0, i1 = r0.next_indices(), r1.next_indices()
    assert not set(i0.tolist()) & set(i1.tolist())
