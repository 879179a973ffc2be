"""tiktoken with the trained merges gives exactly HF ``tokenizers``' ids (real and adversarial text), and
the stage falls back to ``tokenizers`` where that cannot be guaranteed."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer, normalizers

from stages.tokenize import fast_bpe
from stages.tokenize.config import TrainTokenizer
from stages.tokenize.encode import worker_encoder, worker_tokenizer
from stages.tokenize.tokenizer import train_bpe

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SITE = Path(sysconfig.get_paths()["purelib"])


def _real_texts(root: Path, max_chars: int, every: int, offset: int = 0) -> list[str]:
    """Every ``every``-th Python source under ``root`` (sorted), until ``max_chars`` characters."""
    out, total = [], 0
    for p in sorted(root.rglob("*.py"))[offset::every]:
        text = p.read_text(encoding="utf-8", errors="replace")
        out.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return out


@pytest.fixture(scope="module")
def trained() -> str:
    """A 4k byte-level BPE trained on real Python sources: its ``tokenizer.json``."""
    sample = _real_texts(STDLIB, 1_500_000, every=3)
    return train_bpe(sample, TrainTokenizer(vocab_size=4000, sample_docs=len(sample))).to_str()


def _hf_ids(tok_json: str, texts: list[str]) -> list[list[int]]:
    tok = worker_tokenizer(tok_json)
    return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


def _fast_ids(tok_json: str, texts: list[str], threads: int = 1) -> list[list[int]]:
    return [list(ids) for ids in worker_encoder(tok_json, "tiktoken", threads)(texts)]


def test_identical_ids_on_real_python_sources_and_docstrings(trained):
    assert fast_bpe.fast_encoder(trained)[0] is not None
    # Text the tokenizer was not trained on: other stdlib files and installed packages' sources.
    texts = _real_texts(STDLIB, 1_000_000, every=3, offset=1) + _real_texts(SITE, 1_000_000, every=97)
    assert len(texts) > 50
    want = _hf_ids(trained, texts)
    assert _fast_ids(trained, texts) == want
    assert _fast_ids(trained, texts, threads=2) == want


ADVERSARIAL = [
    " " * 5000, " " * 5000 + "x", "x" + " " * 999, "\n" * 3000 + " a", "\t \t \n  \n" * 500, "a  b   c    d",
    " \u00a0 \u3000\u2028\u2029\u200b\u180e\u0085\x0b\x0c x", "trailing spaces   ",
    "🙂🙂🙂", "👩\u200d👩\u200d👧 family", "🇫🇷🇯🇵 flags", "👍🏽 tone", "e\u0301 combining", "ǅ titlecase",
    "東京タワー 한국어 данные λόγος עברית العربية हिन्दी ไทย", "mixed日本語and English123数字",
    "\x00\x01\x02\x1f\x7f control", "\ufeffBOM", "\ue000 private \uffff nonchar", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
    "٣٤ ３４ Ⅻ ² digits", "𑼀𑼁 Kawi 𞓐 Nag Mundari 𱍐 CJK ext H", "it's IT'S we'll WE'LL they're ’s",
    "<|endoftext|> <|pad|> <|im_start|>user", "x" * 100_000, "abc" * 30_000, "東" * 20_000,
    "".join(chr(c) for c in range(0x20, 0x3000)),
]


def test_identical_ids_on_adversarial_text(trained):
    rng = random.Random(0)
    palette = [s[:6] for s in ADVERSARIAL if s.strip()] + [" ", "  ", "\n", "\t", "'s", "'", "0", "-"]
    fuzz = ["".join(rng.choice(palette) for _ in range(rng.randint(1, 80))) for _ in range(2000)]
    every_char = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    blocks = [every_char[i:i + 2000] for i in range(0, len(every_char), 2000)]
    spaced = [" ".join(every_char[i:i + 400]) for i in range(0, len(every_char), 4000)]
    texts = ADVERSARIAL + fuzz + blocks + spaced
    assert _fast_ids(trained, texts) == _hf_ids(trained, texts)


def test_lone_surrogates_are_refused_by_both(trained):
    text = "ok \ud800 broken"
    with pytest.raises(TypeError):
        _hf_ids(trained, [text])
    with pytest.raises(UnicodeEncodeError):
        _fast_ids(trained, [text])


def _edited(tok_json: str, edit) -> str:
    spec = json.loads(tok_json)
    edit(spec)
    return json.dumps(spec)


def test_tokenizers_tiktoken_cannot_match_are_refused_with_the_reason(trained):
    tok = Tokenizer.from_str(trained)
    tok.normalizer = normalizers.NFKC()
    cases = {
        "normalizer": tok.to_str(),
        "not special": _edited(trained, lambda s: s["added_tokens"].append(
            {"id": 4000, "content": "<tool>", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": False})),
        "prefix space": _edited(trained, lambda s: s["pre_tokenizer"].update(add_prefix_space=True)),
        "merge order": _edited(trained, lambda s: s["model"]["merges"].reverse()),
        "dropout": _edited(trained, lambda s: s["model"].update(dropout=0.1)),
    }
    for what, tok_json in cases.items():
        enc, why = fast_bpe.fast_encoder(tok_json)
        assert enc is None and why, what
    assert "normalizer" in fast_bpe.fast_encoder(cases["normalizer"])[1]
    assert "<tool>" in fast_bpe.fast_encoder(cases["not special"])[1]


def test_a_token_no_merge_makes_is_refused(trained):
    # tiktoken would reach the token by concatenation (or whole-piece lookup); HF's BPE never makes it.
    spec = json.loads(trained)
    spec["model"]["merges"].pop(100)
    enc, why = fast_bpe.fast_encoder(json.dumps(spec))
    assert enc is None and "not made by any merge" in why


def test_the_encode_step_writes_identical_files_with_either_encoder(trained, tmp_path):
    from stages.common.records import InputFile
    from stages.tokenize.encode import EncodeParams, encode_file
    from stages.tokenize.layout import Layout
    from stages.tokenize.sources import Sources, val_threshold

    texts = _real_texts(SITE, 600_000, every=211) + ADVERSARIAL[:12] + ["x" * 3500 + " tail"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    sources = Sources([InputFile(0, str(src), "in.jsonl")], "text", "id", "input")
    outputs = {}
    for engine, threads in (("tokenizers", 1), ("tiktoken", 1), ("tiktoken", 2)):
        out = tmp_path / f"{engine}-{threads}"
        p = EncodeParams(seed=0, val_threshold=val_threshold(0.2), max_chunk_chars=2000, batch_chars=50_000,
                         eot=0, dtype="uint16", engine=engine, threads=threads)
        stats = encode_file(sources, sources.files[0], trained, p, str(out))
        lay = Layout(str(out))
        outputs[engine, threads] = (stats, [Path(lay.encoded(0, s)).read_bytes() for s in ("train", "val")])
    assert stats["docs_cut"] > 0 and stats["tokens"]["train"] > 100_000  # long documents were cut
    assert outputs["tokenizers", 1] == outputs["tiktoken", 1] == outputs["tiktoken", 2]
