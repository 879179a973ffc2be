"""GGUF export: the file loads back in transformers (``gguf_file=``) with the same logits and the same
tokenizer ids as the exported model directory, and ``seedline export gguf`` finds a run's stage model."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import torch
import transformers
from typer.testing import CliRunner

from pipeline.cli import load_plugins
from stages.lm.gguf_export import write_gguf
from stages.lm.hf import export_hf
from stages.lm.model import CausalLM, ModelConfig
from stages.tokenize import tokenizer as seedline_tok
from stages.tokenize.config import TrainTokenizer

TEXTS = [
    "def f(x):\n    return x  # comment\n",
    "The quick brown fox, 12345 times; naïve café über straße.",
    "  leading spaces\t\ttabs\n\n\nnewlines   and    runs      of spaces",
    "emoji 🚀🔥 mixed scripts Ελληνικά русский 中文 日本語 العربية",
    "<|im_start|>user\nWhat does open() return?<|im_end|>\n<|im_start|>assistant\nA file object.<|im_end|>",
    "control \x00\x01\x7f chars and <|endoftext|> inside <|pad|> text",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """Seedline's own byte-level BPE, trained on real text (standard library sources)."""
    import json as json_mod
    import pathlib
    import textwrap as tw

    corpus = [inspect.getsource(m) for m in (json_mod, pathlib, tw, inspect)]
    tok = seedline_tok.train_bpe(corpus, TrainTokenizer(vocab_size=600, min_frequency=2))
    out = tmp_path_factory.mktemp("tok")
    seedline_tok.save(tok, str(out), model_max_length=128)
    return out


def make_model(vocab: int, **kw) -> CausalLM:
    cfg = ModelConfig(**{**dict(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                max_seq_len=128, norm_eps=1e-5, rope_theta=50000.0), **kw})
    torch.manual_seed(0)
    return CausalLM(cfg).eval()


def load_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("kv_heads,tied", [(2, False), (4, True), (1, False)], ids=["gqa", "mha-tied", "mqa"])
def test_gguf_loads_in_transformers_with_the_same_logits(tmp_path, tokenizer_dir, kv_heads, tied):
    # vocab larger than the tokenizer: the padding ids must survive as unused tokens
    model = make_model(640, n_kv_heads=kv_heads, tie_embeddings=tied)
    export_hf(model, str(tokenizer_dir), str(tmp_path / "model"))
    out = tmp_path / "gguf" / "model.gguf"
    write_gguf(str(tmp_path / "model"), str(out))
    g = load_gguf(out)
    assert type(g).__name__ == "LlamaForCausalLM"
    assert (g.config.num_key_value_heads, g.config.vocab_size, g.config.tie_word_embeddings) == (
        kv_heads, 640, tied)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), dtype=torch.float32)
    ids = torch.randint(0, 640, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs, orig = model(ids).logits, g(ids).logits, hf.eval()(ids).logits
    assert (theirs - orig).abs().max().item() <= 1e-4
    assert (theirs - ours).abs().max().item() <= 1e-4


def test_gguf_tokenizer_gives_the_same_ids_and_text(tmp_path, tokenizer_dir):
    model = make_model(640)
    export_hf(model, str(tokenizer_dir), str(tmp_path / "model"))
    out = tmp_path / "model.gguf"
    write_gguf(str(tmp_path / "model"), str(out))
    orig = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    texts = [*TEXTS, textwrap.dedent(inspect.getsource(write_gguf))]
    for text in texts:
        ids = orig(text).input_ids
        assert back(text).input_ids == ids, text
        assert back.decode(ids) == orig.decode(ids) == text
    # the special tokens stay whole and keep their ids (0-3), and so do bos/eos/pad
    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    assert back.convert_tokens_to_ids(specials) == [0, 1, 2, 3]
    assert (back.eos_token_id, back.pad_token_id) == (orig.eos_token_id, orig.pad_token_id)
    assert back.chat_template == orig.chat_template


def test_f16_gguf_loads_close(tmp_path, tokenizer_dir):
    model = make_model(640)
    export_hf(model, str(tokenizer_dir), str(tmp_path / "model"))
    f32, f16 = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_gguf(str(tmp_path / "model"), str(f32))
    write_gguf(str(tmp_path / "model"), str(f16), file_type="f16")
    assert f16.stat().st_size < 0.6 * f32.stat().st_size
    ids = torch.randint(0, 640, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (load_gguf(f16)(ids).logits - model(ids).logits).abs().max().item()
    assert 0 < diff <= 1e-2


def _seedline(*args: str):
    """``seedline ARGS`` with the commands the installed plugins add (``export`` among them)."""
    import typer

    app = typer.Typer()
    load_plugins(app)
    return CliRunner().invoke(app, list(args))


def _fake_run(root, tokenizer_dir):
    """A run directory as the pipeline leaves it: run.json naming the stages, sft with an exported model."""
    run = root / "runs" / "demo"
    export_hf(make_model(640), str(tokenizer_dir), str(run / "sft-0123456789" / "model"))
    (run / "tokenize-aaaaaaaaaa").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({
        "config": {"name": "demo"},
        "stages": {"tokenize": "tokenize-aaaaaaaaaa", "sft": "sft-0123456789"}}))
    return run


def test_cli_export_gguf_writes_the_stage_model(tmp_path, tokenizer_dir):
    run = _fake_run(tmp_path, tokenizer_dir)
    res = _seedline("export", "gguf", str(run), "--stage", "sft")
    assert res.exit_code == 0, res.output
    out = run / "sft-0123456789" / "model.gguf"
    assert str(out) in res.output
    from gguf import GGUFReader

    fields = GGUFReader(str(out)).fields
    assert bytes(fields["general.name"].parts[-1]).decode() == "demo-sft"
    assert load_gguf(out).config.num_hidden_layers == 2
    # --out, and the default stage (the last one with a model)
    res = _seedline("export", "gguf", str(run), "--out", str(tmp_path / "x.gguf"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "x.gguf").read_bytes() == out.read_bytes()


def test_cli_export_gguf_errors_name_what_is_missing(tmp_path, tokenizer_dir):
    run = _fake_run(tmp_path, tokenizer_dir)
    cases = ((["--stage", "dpo"], "no stage 'dpo'"), (["--stage", "tokenize"], "no exported model"),
             (["--type", "q4"], "--type"))
    for args, expect in cases:
        res = _seedline("export", "gguf", str(run), *args)
        assert res.exit_code == 2, res.output
        assert expect in res.output and "Traceback" not in res.output
    res = _seedline("export", "gguf", str(tmp_path / "nowhere"))
    assert res.exit_code == 2 and "no run.json" in res.output
    assert not list(run.rglob("*.gguf"))
