"""Hugging Face export/import: the export loads as LlamaForCausalLM and computes the same thing."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from stages.lm.hf import export_hf, import_hf
from stages.lm.model import CausalLM, ModelConfig

VOCAB = 96


def make_model(seed: int = 0, **kw) -> CausalLM:
    cfg = ModelConfig(**{**dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                max_seq_len=128, norm_eps=1e-5), **kw})
    torch.manual_seed(seed)
    return CausalLM(cfg).eval()


def load_hf(path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A real byte-level BPE tokenizer saved as a Hugging Face fast-tokenizer directory."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(str(out))
    return out


@pytest.mark.parametrize(
    "kv_heads,tied,theta",
    [(4, False, 10000.0), (2, False, 10000.0), (1, False, 10000.0), (4, True, 10000.0), (2, True, 500000.0),
     (1, True, 1234.5)],
    ids=["mha", "gqa", "mqa", "mha-tied", "gqa-tied-theta5e5", "mqa-tied-theta1234"],
)
def test_export_matches_transformers_llama_and_imports_back(tmp_path, kv_heads, tied, theta):
    model = make_model(n_kv_heads=kv_heads, tie_embeddings=tied, rope_theta=theta)
    export_hf(model, None, str(tmp_path))
    hf = load_hf(tmp_path)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_key_value_heads == kv_heads and hf.config.tie_word_embeddings == tied
    ids = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))
    back = import_hf(str(tmp_path))
    assert back.cfg == model.cfg
    with torch.no_grad():
        ours, theirs, again = model(ids).logits, hf(ids).logits, back(ids).logits
        # same loss too: our labels are pre-aligned, transformers shifts its own
        labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
        assert abs(model(ids, labels=labels).loss.item() - hf(ids, labels=ids).loss.item()) < 1e-5
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert torch.equal(ours, again)


def test_greedy_generation_matches_transformers_generate(tmp_path):
    model = make_model(n_kv_heads=2, rope_theta=50000.0)
    export_hf(model, None, str(tmp_path))
    hf = load_hf(tmp_path)
    prompt = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)[:, 7:].tolist()
    cached = model.generate(prompt, max_new_tokens=12)
    assert cached == model.generate(prompt, max_new_tokens=12, use_cache=False)
    assert cached == theirs


def test_export_with_tokenizer_copies_files_and_special_ids(tmp_path, tokenizer_dir):
    model = make_model(tie_embeddings=True)
    out = tmp_path / "export"
    export_hf(model, str(tokenizer_dir), str(out))
    cfg = json.loads((out / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg["rope_theta"] == 10000.0 and cfg["rms_norm_eps"] == 1e-5
    # weights only as safetensors: nothing pickled
    assert not [p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    ids = tok("the lazy fox", return_tensors="pt").input_ids
    hf = load_hf(out)
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4
    assert torch.equal(import_hf(str(out)).embed.weight, model.embed.weight)


def test_export_rejects_a_tokenizer_larger_than_the_vocabulary(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="vocab_size"):
        export_hf(make_model(vocab_size=50), str(tokenizer_dir), str(tmp_path))


def test_sharded_bfloat16_export_loads_in_transformers_and_back(tmp_path):
    model = make_model()
    export_hf(model, None, str(tmp_path / "one"))
    export_hf(model, None, str(tmp_path), dtype=torch.bfloat16, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    back = import_hf(str(tmp_path))
    assert back.embed.weight.dtype == torch.float32
    assert torch.equal(back.embed.weight, model.embed.weight.to(torch.bfloat16).float())
    # exporting again unsharded removes the stale shards
    export_hf(model, None, str(tmp_path))
    assert not any((tmp_path / s).exists() for s in shards)
    assert torch.equal(import_hf(str(tmp_path)).norm.weight, model.norm.weight)


def test_import_rejects_what_it_cannot_represent(tmp_path):
    export_hf(make_model(), None, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(
        {**cfg, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}))
    with pytest.raises(ValueError, match="rope"):
        import_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="llama"):
        import_hf(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(str(tmp_path / "missing"))


def test_import_reads_a_checkpoint_saved_by_transformers(tmp_path):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=80,
                                      num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, rms_norm_eps=1e-6,
                                      max_position_embeddings=64, tie_word_embeddings=True,
                                      rope_parameters={"rope_type": "default", "rope_theta": 20000.0})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(str(tmp_path))
    model = import_hf(str(tmp_path))
    assert (model.cfg.n_kv_heads, model.cfg.rope_theta, model.cfg.norm_eps) == (2, 20000.0, 1e-6)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4
