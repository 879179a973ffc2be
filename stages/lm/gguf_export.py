"""GGUF export: a stage's ``model/`` (a ``LlamaForCausalLM`` directory) as one llama.cpp GGUF file.

Written with the ``gguf`` package's ``GGUFWriter``: ``llama`` architecture metadata and tensor names
(``token_embd``, ``blk.N.attn_q`` ...), q/k rows permuted the way llama.cpp's converter does (its rotary
kernel pairs adjacent dimensions, Hugging Face's pairs the two halves), and the tokenizer as a
GPT-2-style byte-level BPE (``tokenizer.ggml.model = gpt2``: the vocabulary, the merges, token types
with the special tokens marked as control tokens). llama.cpp's own converter rejects Seedline's
tokenizer because it recognises pre-tokenizers by a checksum of known models; the GPT-2 regex that
Seedline's tokenizer uses is llama.cpp's ``gpt-2`` pre-tokenizer, so that is what the file says.

``transformers`` reads the file back with ``from_pretrained(dir, gguf_file=name)``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.errors import ConfigError

FILE_TYPES = ("f32", "f16")


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection from half-split rotary order to llama.cpp's interleaved order (the
    inverse of what transformers' GGUF loader undoes for ``llama``)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_tensors(hf_sd: dict[str, np.ndarray], cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """``LlamaForCausalLM`` weights (float32 numpy) under llama.cpp's tensor names, q/k permuted."""
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    out = {"token_embd.weight": hf_sd["model.embed_tokens.weight"],
           "output_norm.weight": hf_sd["model.norm.weight"]}
    if "lm_head.weight" in hf_sd and not cfg.get("tie_word_embeddings", False):
        out["output.weight"] = hf_sd["lm_head.weight"]  # absent: llama.cpp ties it to token_embd
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out[b + "attn_q.weight"] = _permute_rotary(hf_sd[p + "self_attn.q_proj.weight"], heads)
        out[b + "attn_k.weight"] = _permute_rotary(hf_sd[p + "self_attn.k_proj.weight"], kv_heads)
        for hf_name, g_name in names.items():
            out[f"{b}{g_name}.weight"] = hf_sd[f"{p}{hf_name}.weight"]
    return out


def _merges(model: dict[str, Any]) -> list[str]:
    # tokenizers >= 0.20 saves merges as pairs, older versions as "a b" strings
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def gguf_vocab(tokenizer_json: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Tokens (id order, padded to the model's ``vocab_size``), token types and merges of a byte-level
    BPE ``tokenizer.json``. Special added tokens are CONTROL, other added tokens USER_DEFINED, padding
    ids UNUSED."""
    from gguf import TokenType

    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export supports byte-level BPE tokenizers, not {model.get('type')!r}")
    by_id: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in tokenizer_json.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if by_id and max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        tok, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(tok)
        types.append(int(kind))
    return {"tokens": tokens, "types": types, "merges": _merges(model)}


def _read_model_dir(root: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``config.json`` and the float32 weights of a Hugging Face Llama directory (safetensors only)."""
    from safetensors.torch import load_file

    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root}: no config.json (not an exported model directory)")
    cfg = json.loads((root / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{root}: GGUF export needs a Llama model, got model_type {cfg.get('model_type')!r}")
    index = root / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    sd: dict[str, np.ndarray] = {}
    for name in files:
        # through torch: numpy has no bfloat16
        sd |= {k: v.float().numpy() for k, v in load_file(str(root / name)).items()}
    return cfg, sd


def _add_metadata(w, cfg: dict[str, Any], name: str, file_type: int) -> None:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))


def _add_tokenizer(w, root: Path, cfg: dict[str, Any]) -> None:
    tok_file = root / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{root}: no tokenizer.json (a GGUF file carries its tokenizer)")
    vocab = gguf_vocab(json.loads(tok_file.read_text()), cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, as Seedline's ByteLevel(use_regex=True)
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        if cfg.get(key) is not None:
            add(int(cfg[key]))
    w.add_add_bos_token(False)  # Seedline's tokenizer adds no BOS when encoding
    tok_cfg = root / "tokenizer_config.json"
    template = json.loads(tok_cfg.read_text()).get("chat_template") if tok_cfg.is_file() else None
    if template is None and (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text()
    if template:
        w.add_chat_template(template)


def write_gguf(model_dir: str, out_file: str, name: str = "seedline", file_type: str = "f32") -> str:
    """Write the Llama directory ``model_dir`` (local or a URL) as the GGUF file ``out_file``
    (atomically). ``file_type`` ``f16`` halves the matrices; norms stay float32 as llama.cpp wants."""
    import gguf

    if file_type not in FILE_TYPES:
        raise ValueError(f"file type {file_type!r}: choose one of {', '.join(FILE_TYPES)}")
    with tempfile.TemporaryDirectory(prefix="seedline-gguf-") as tmp:
        root = storage.download_dir(model_dir, Path(tmp))
        cfg, hf_sd = _read_model_dir(root)
        w = gguf.GGUFWriter(None, "llama")
        ftype = gguf.LlamaFileType.ALL_F32 if file_type == "f32" else gguf.LlamaFileType.MOSTLY_F16
        _add_metadata(w, cfg, name, int(ftype))
        _add_tokenizer(w, root, cfg)
        for tname, t in gguf_tensors(hf_sd, cfg).items():
            w.add_tensor(tname, t.astype(np.float16) if file_type == "f16" and t.ndim > 1 else t)
        with storage.atomic_local_file(out_file) as dest:
            w.write_header_to_file(path=dest)
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
    return out_file


def stage_model_dir(run_dir: str, stage: str | None) -> tuple[str, str]:
    """(stage name, its ``model/`` directory) in ``run_dir``; ``stage`` None picks the last stage of the
    run that exported a model. Errors name what is missing (``ConfigError``: exit code 2)."""
    from pipeline.state import recorded_stage_dirs

    run = storage.read_json_or(storage.join(run_dir, "run.json"), None)
    if run is None:
        raise ConfigError("RUN_DIR", f"no run.json in {run_dir}")
    stages = recorded_stage_dirs(run_dir, run)  # instance -> directory (in the run or the shared store)
    with_model = [s for s, d in stages.items() if storage.exists(storage.join(d, "model", "config.json"))]
    if stage is None:
        if not with_model:
            raise ConfigError("--stage", f"no stage of {run_dir} has exported a model yet")
        stage = with_model[-1]
    if stage not in stages:
        raise ConfigError("--stage", f"no stage {stage!r} in {run_dir} (stages: {', '.join(stages)})")
    if stage not in with_model:
        where = storage.join(stages[stage], "model")
        raise ConfigError("--stage", f"stage {stage!r} has no exported model in {where} "
                          f"(models: {', '.join(with_model) or 'none yet'})")
    return stage, storage.join(stages[stage], "model")


def export_run_gguf(run_dir: str, stage: str | None = None, out: str | None = None,
                    file_type: str = "f32") -> str:
    """``seedline export gguf``: the stage's model as ``out`` (default ``<stage dir>/model.gguf``)."""
    stage, model_dir = stage_model_dir(run_dir, stage)
    out = out or storage.join(model_dir.rsplit("/", 1)[0], "model.gguf")
    run_name = storage.read_json(storage.join(run_dir, "run.json")).get("config", {}).get("name", "seedline")
    return write_gguf(model_dir, out, name=f"{run_name}-{stage}", file_type=file_type)
