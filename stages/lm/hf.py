"""Hugging Face export and import: a ``CausalLM`` <-> a ``LlamaForCausalLM`` directory.

The export is what ``transformers.AutoModelForCausalLM.from_pretrained`` (and vLLM, lm-eval-harness,
llama.cpp's converter) read: ``config.json``, ``model.safetensors`` (or shards plus
``model.safetensors.index.json``), ``generation_config.json`` and the tokenizer's files. Weights are
safetensors only (no pickle). The fused q/k/v and gate/up projections are split into Llama's separate
matrices; both sides use half-split rotary embeddings, so no q/k permutation is needed.

``config.json`` is written last: a directory with one is complete.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline import storage
from stages.lm.model import CausalLM, ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
DEFAULT_SHARD_BYTES = 5 * 1024**3


def to_hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under ``LlamaForCausalLM`` names (contiguous copies, ready to save)."""
    cfg = model.cfg
    q, kv, f = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        qkv, gate_up = block.attn.qkv.weight, block.ffn.gate_up.weight
        sd |= {
            p + "self_attn.q_proj.weight": qkv[:q],
            p + "self_attn.k_proj.weight": qkv[q : q + kv],
            p + "self_attn.v_proj.weight": qkv[q + kv :],
            p + "self_attn.o_proj.weight": block.attn.out.weight,
            p + "mlp.gate_proj.weight": gate_up[:f],
            p + "mlp.up_proj.weight": gate_up[f:],
            p + "mlp.down_proj.weight": block.ffn.down.weight,
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "post_attention_layernorm.weight": block.ffn_norm.weight,
        }
    if model.lm_head is not None:  # tied models store the embedding only, as transformers does
        sd["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().contiguous() for k, v in sd.items()}


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``LlamaForCausalLM`` weights -> this model's state dict (fusing q/k/v and gate/up)."""
    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise KeyError(f"weight {name!r} missing from the Hugging Face checkpoint")
        return sd[name]

    out = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    for i in range(cfg.n_layers):
        p, a = f"model.layers.{i}.", f"layers.{i}."
        out |= {
            a + "attn.qkv.weight": torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
            a + "attn.out.weight": take(p + "self_attn.o_proj.weight"),
            a + "ffn.gate_up.weight": torch.cat([take(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")]),
            a + "ffn.down.weight": take(p + "mlp.down_proj.weight"),
            a + "attn_norm.weight": take(p + "input_layernorm.weight"),
            a + "ffn_norm.weight": take(p + "post_attention_layernorm.weight"),
        }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    return out


def hf_config(cfg: ModelConfig, dtype: torch.dtype, special: dict[str, int | None]) -> dict[str, Any]:
    """``config.json`` for ``LlamaForCausalLM``. Rope settings are written both as ``rope_theta``
    (older transformers) and ``rope_parameters`` (newer); ``rms_norm_eps`` always (defaults differ)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": special.get("bos_token_id"),
        "eos_token_id": special.get("eos_token_id"),
        "pad_token_id": special.get("pad_token_id"),
    }


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Read a Llama ``config.json`` back into a ``ModelConfig``; unsupported variants are errors."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"expected a Llama checkpoint (model_type 'llama'), got {hf.get('model_type')!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"unsupported rope scaling {rope!r}: only the default rotary embedding is supported")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, ok) != ok:
            raise ValueError(f"unsupported Llama variant: {key}={hf[key]!r} (need {ok!r})")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise ValueError(f"unsupported head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_dim=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    )


def tokenizer_special_ids(tokenizer_dir: str, vocab_size: int) -> dict[str, int | None]:
    """bos/eos/pad ids of the tokenizer in ``tokenizer_dir``; checks it fits the model's vocabulary."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="seedline-tok-") as tmp:
        tok = AutoTokenizer.from_pretrained(str(storage.download_dir(tokenizer_dir, Path(tmp))))
        if len(tok) > vocab_size:
            raise ValueError(f"tokenizer in {tokenizer_dir} has {len(tok)} tokens but the model's "
                             f"vocab_size is {vocab_size}")
        return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id}


def _shards(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split weights, in order, into groups of at most ``max_bytes`` (a larger tensor goes alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def _write_weights(sd: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> set[str]:
    """Write safetensors file(s) (+ index when sharded); return the file names written."""
    shards = _shards(sd, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        with storage.atomic_local_file(storage.join(out_dir, "model.safetensors")) as tmp:
            save_file(shards[0], str(tmp), metadata=meta)
        return {"model.safetensors"}
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        with storage.atomic_local_file(storage.join(out_dir, name)) as tmp:
            save_file(shard, str(tmp), metadata=meta)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in shard}}
    storage.write_json(storage.join(out_dir, "model.safetensors.index.json"), index)
    return {*names, "model.safetensors.index.json"}


def export_hf(
    model: CausalLM,
    tokenizer_dir: str | None,
    out_dir: str,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> str:
    """Write ``model`` (and the tokenizer in ``tokenizer_dir``, if given) as a ``LlamaForCausalLM``
    directory at ``out_dir`` (local or a URL). ``dtype`` converts the weights (default: as trained).
    bos/eos/pad ids come from the tokenizer (None without one). Returns ``out_dir``."""
    cfg = model.cfg
    sd = to_hf_state_dict(model)
    dtype = dtype or sd["model.embed_tokens.weight"].dtype
    sd = {k: v.to(device="cpu", dtype=dtype) for k, v in sd.items()}
    special = tokenizer_special_ids(tokenizer_dir, cfg.vocab_size) if tokenizer_dir else {}
    storage.makedirs(out_dir)
    written = _write_weights(sd, out_dir, max_shard_bytes)
    for name in storage.listdir(out_dir):  # weights of an earlier export with another sharding
        if name.startswith("model") and ".safetensors" in name and name not in written:
            storage.remove(storage.join(out_dir, name))
    if tokenizer_dir:
        for name in storage.listdir(tokenizer_dir):
            if name in TOKENIZER_FILES:
                data = storage.read_bytes(storage.join(tokenizer_dir, name))
                storage.write_bytes(storage.join(out_dir, name), data)
    gen = {k: v for k, v in special.items() if v is not None} | {"do_sample": False}
    storage.write_json(storage.join(out_dir, "generation_config.json"), gen)
    storage.write_json(storage.join(out_dir, "config.json"), hf_config(cfg, dtype, special))
    return out_dir


def _read_weights(root: Path) -> dict[str, torch.Tensor]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (root / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{root}: no model.safetensors or model.safetensors.index.json "
                                "(only safetensors checkpoints are read)")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        sd |= load_file(str(root / name))
    return sd


def import_hf(path: str, dtype: torch.dtype = torch.float32) -> CausalLM:
    """Load a ``LlamaForCausalLM`` directory (an export of this module, or any plain Llama
    checkpoint in safetensors) as a ``CausalLM`` with ``dtype`` weights. No tokenizer is needed."""
    with tempfile.TemporaryDirectory(prefix="seedline-hf-") as tmp:
        root = storage.download_dir(path, Path(tmp))
        if not (root / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
        cfg = model_config_from_hf(json.loads((root / "config.json").read_text()))
        sd = from_hf_state_dict(cfg, _read_weights(root))
    with torch.device("meta"):  # no random init: every weight comes from the checkpoint
        model = CausalLM(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    return model
