"""Cutting long documents and building the tokenizer (no Ray)."""

from __future__ import annotations

import random

from stages.tokenize.config import TrainTokenizer
from stages.tokenize.encode import worker_tokenizer
from stages.tokenize.sources import split_text
from stages.tokenize.tokenizer import load, save, special_ids, train_bpe


def _text(rng: random.Random, n_words: int) -> str:
    words = ["the", "data", "naïve", "東京", "x=1;", "  ", "\n", "\n\n", "🙂", "token", "Ünïcode", "--"]
    return "".join(rng.choice(words) + rng.choice([" ", " ", "", "\t", "\n"]) for _ in range(n_words))


def test_long_text_is_cut_into_bounded_pieces_that_encode_like_the_whole(tmp_path):
    rng = random.Random(0)
    text = _text(rng, 40_000)
    pieces = split_text(text, 2000)
    assert "".join(pieces) == text and len(pieces) > 1
    assert all(1000 < len(p) <= 2000 for p in pieces[:-1]) and len(pieces[-1]) <= 2000
    assert all(p[0].isspace() and not p[1].isspace() for p in pieces[1:])  # cut before " word"
    no_space = "y" * 5000
    assert split_text(no_space, 2000) == ["y" * 2000, "y" * 2000, "y" * 1000]
    assert split_text("short", 2000) == ["short"]
    # With byte-level BPE the pieces' tokens are exactly the whole text's tokens.
    tok = train_bpe([_text(rng, 3000) for _ in range(20)], TrainTokenizer(vocab_size=500, sample_docs=20))
    save(tok, str(tmp_path / "tok"), 128)
    enc = worker_tokenizer((tmp_path / "tok" / "tokenizer.json").read_text())
    whole = enc.encode(text, add_special_tokens=False).ids
    assert [i for p in pieces for i in enc.encode(p, add_special_tokens=False).ids] == whole


def test_training_is_deterministic_and_special_tokens_come_first(tmp_path):
    rng = random.Random(1)
    texts = [_text(rng, 500) for _ in range(30)]
    spec = TrainTokenizer(vocab_size=400, sample_docs=30)
    shas = [save(train_bpe(texts, spec), str(tmp_path / f"t{i}"), 64) for i in range(2)]
    assert shas[0] == shas[1]
    files = [(tmp_path / f"t{i}" / "tokenizer.json").read_bytes() for i in range(2)]
    assert files[0] == files[1]
    tok = load(str(tmp_path / "t0"))
    assert special_ids(tok) == {"eot": 0, "pad": 1, "im_start": 2, "im_end": 3}
    # Encoding never produces a special id from text that spells one.
    enc = worker_tokenizer((tmp_path / "t0" / "tokenizer.json").read_text())
    ids = enc.encode("before <|endoftext|> after <|im_start|>", add_special_tokens=False).ids
    assert not set(ids) & {0, 1, 2, 3}
    assert enc.decode(ids, skip_special_tokens=False) == "before <|endoftext|> after <|im_start|>"


def test_a_loaded_tokenizer_without_the_special_tokens_gets_them_appended(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(c): i for i, c in enumerate(range(97, 123))}
    plain = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.save(str(tmp_path / "plain.json"))
    tok = load(str(tmp_path / "plain.json"))
    assert special_ids(tok) == {"eot": 26, "pad": 27, "im_start": 28, "im_end": 29}
