"""LoRA adapters on Seedline's ``CausalLM``, saved in PEFT's format under Hugging Face Llama names.

Why Seedline's own layers and not ``peft.get_peft_model``: peft adapts whole ``nn.Linear`` modules, and
Seedline fuses q/k/v into one ``attn.qkv`` projection and gate/up into one ``ffn.gate_up`` (one matmul
instead of three or two). peft on ``qkv`` would train one A shared by q, k and v, which is not the LoRA a
``LlamaForCausalLM`` user configures (separate q_proj/k_proj/v_proj adapters, each with its own A) and
cannot express a subset such as ``q_proj, v_proj`` (peft's own default for Llama) at all. Splitting the
fused projections so that peft could wrap them would cost the fused matmuls in every step and change the
base's arithmetic, while the DPO reference "base with adapters disabled" must compute exactly what the
plain model computes. So ``LoRALinear`` keeps the fused base projection untouched and adds one (A, B) pair
per adapted slice of its output rows (``q_proj`` = the first rows of ``qkv``): per slice, exactly PEFT's
``lora.Linear`` (A initialised like ``nn.Linear``, kaiming-uniform with a = sqrt(5); B zero; output
``base(x) + alpha / r * B A dropout(x)``). The saved ``adapter_model.safetensors`` holds each slice's A and
B under PEFT's keys (``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``) and
``adapter_config.json`` is written by ``peft.LoraConfig`` itself, so ``PeftModel.from_pretrained`` loads
the adapter on the exported base. Differences from peft: one dropout mask per fused projection (not per
slice); ``modules_to_save`` modules are trained in place (no frozen copy is kept).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pipeline import storage
from stages.lm.lora_config import LoraSpec
from stages.lm.model import CausalLM, ModelConfig

# Hugging Face module -> (Seedline module inside a block, the Llama sub-module that holds it)
PLACES = {"q_proj": ("attn.qkv", "self_attn"), "k_proj": ("attn.qkv", "self_attn"),
          "v_proj": ("attn.qkv", "self_attn"), "o_proj": ("attn.out", "self_attn"),
          "gate_proj": ("ffn.gate_up", "mlp"), "up_proj": ("ffn.gate_up", "mlp"),
          "down_proj": ("ffn.down", "mlp")}
SAVED = {"lm_head": ("lm_head", "lm_head"), "embed_tokens": ("embed", "model.embed_tokens")}
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> LlamaForCausalLM
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def output_rows(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """The rows of its Seedline projection's output that each Hugging Face module is."""
    q, kv, f, d = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim, cfg.dim
    return {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv), "o_proj": (0, d),
            "gate_proj": (0, f), "up_proj": (f, 2 * f), "down_proj": (0, d)}


class Adapter(nn.Module):
    """One low-rank pair: ``B(A(h))``; A as ``nn.Linear`` initialises it (PEFT's default), B zero."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(h))


class LoRALinear(nn.Module):
    """A frozen (possibly fused) ``nn.Linear`` plus adapters on named slices of its output rows."""

    def __init__(self, base: nn.Linear, rows: dict[str, tuple[int, int]], spec: LoraSpec):
        super().__init__()
        self.base = base
        self.rows = dict(sorted(rows.items(), key=lambda kv: kv[1]))
        self.adapters = nn.ModuleDict({n: Adapter(base.in_features, e - s, spec.rank)
                                       for n, (s, e) in self.rows.items()})
        self.scaling = spec.alpha / spec.rank
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.enabled = True

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (what ``stages.lm.hf.to_hf_state_dict`` exports)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y  # exactly the base projection
        h = self.dropout(x)
        parts, pos = [], 0
        for name, (s, e) in self.rows.items():
            if s > pos:
                parts.append(y.new_zeros(*y.shape[:-1], s - pos))
            parts.append(self.adapters[name](h) * self.scaling)
            pos = e
        if pos < y.shape[-1]:
            parts.append(y.new_zeros(*y.shape[:-1], y.shape[-1] - pos))
        return y + (torch.cat(parts, -1) if len(parts) > 1 else parts[0])

    def delta(self, name: str) -> torch.Tensor:
        """``alpha / r * B @ A`` of one slice, in float32."""
        ad = self.adapters[name]
        return (ad.lora_B.weight.float() @ ad.lora_A.weight.float()) * self.scaling


def _module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def apply_lora(model: CausalLM, spec: LoraSpec) -> CausalLM:
    """Freeze ``model`` and add the adapters of ``spec`` in place (deterministic given the torch seed);
    ``spec.modules_to_save`` become trainable. Returns ``model``."""
    model.requires_grad_(False)
    rows = output_rows(model.cfg)
    by_module: dict[str, dict[str, tuple[int, int]]] = {}
    for name in spec.target_names():
        by_module.setdefault(PLACES[name][0], {})[name] = rows[name]
    for block in model.layers:
        for path, slices in by_module.items():
            parent_path, attr = path.rsplit(".", 1)
            parent = _module(block, parent_path)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), slices, spec))
    for name in spec.modules_to_save:
        module = getattr(model, SAVED[name][0])
        if module is None or model.cfg.tie_embeddings:
            raise ValueError(f"lora.modules_to_save: {name} cannot be trained apart: the model ties its "
                             "embedding and output layer")
        module.requires_grad_(True)
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[int, LoRALinear]]:
    """(block index, layer) of every ``LoRALinear`` in ``model`` (an engine's module or a ``CausalLM``)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield int(name.split("layers.", 1)[1].split(".", 1)[0]), module


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model`` computes exactly its base model (PEFT's ``disable_adapter()``)."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m, on in zip(layers, before, strict=True):
            m.enabled = on


def adapter_state_dict(model: CausalLM, spec: LoraSpec) -> dict[str, torch.Tensor]:
    """The trained weights under PEFT's keys for a ``LlamaForCausalLM`` (CPU, contiguous)."""
    sd: dict[str, torch.Tensor] = {}
    for i, layer in lora_layers(model):
        for name, ad in layer.adapters.items():
            key = f"{PEFT_PREFIX}model.layers.{i}.{PLACES[name][1]}.{name}"
            sd[f"{key}.lora_A.weight"] = ad.lora_A.weight
            sd[f"{key}.lora_B.weight"] = ad.lora_B.weight
    for name in spec.modules_to_save:
        seedline, hf = SAVED[name]
        sd[f"{PEFT_PREFIX}{hf}.weight"] = getattr(model, seedline).weight
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def peft_config(spec: LoraSpec, base_model: str) -> Any:
    """``spec`` as a ``peft.LoraConfig`` for a ``LlamaForCausalLM`` at ``base_model``."""
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=list(spec.target_names()),
                      modules_to_save=list(spec.modules_to_save) or None,
                      bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model)


def save_adapter(model: CausalLM, spec: LoraSpec, base_model: str, out_dir: str) -> str:
    """Write ``out_dir/adapter_model.safetensors`` and ``adapter_config.json`` (PEFT's format; the config
    last) for the base at ``base_model``. Returns ``out_dir``."""
    storage.makedirs(out_dir)
    with storage.atomic_local_file(storage.join(out_dir, ADAPTER_WEIGHTS)) as tmp:
        save_file(adapter_state_dict(model, spec), str(tmp), metadata={"format": "pt"})
    with tempfile.TemporaryDirectory(prefix="seedline-adapter-") as tmp:
        peft_config(spec, base_model).save_pretrained(tmp)
        text = (Path(tmp) / ADAPTER_CONFIG).read_text()
    storage.write_text(storage.join(out_dir, ADAPTER_CONFIG), text)
    return out_dir


@torch.no_grad()
def merge_lora(model: CausalLM) -> CausalLM:
    """Add every adapter's update into its base weight, in place (float32 sums, cast back), and disable
    the adapters: the model then computes the merged model with plain projections."""
    for _, layer in lora_layers(model):
        w = layer.base.weight
        for name, (s, e) in layer.rows.items():
            w[s:e] = (w[s:e].float() + layer.delta(name).to(w.device)).to(w.dtype)
        layer.enabled = False
    return model


def trainable_summary(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameter counts and the trainable share (before ZeRO-3 partitions them)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total,
            "trainable_share": trainable / total if total else 0.0}


def base_fingerprint(model_dir: str) -> str:
    """sha256 of the base model's ``config.json`` and weight files (a URL or a local directory): what a
    LoRA checkpoint is only valid on top of."""
    h = hashlib.sha256()
    names = sorted(n for n in storage.listdir(model_dir) if n == "config.json" or n.endswith(".safetensors"))
    for name in names:
        h.update(name.encode() + b"\0")
        with storage.open_read(storage.join(model_dir, name)) as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def resume_base_mismatch(checkpoints: str, fingerprint: str) -> str | None:
    """The newest complete checkpoint under ``checkpoints`` if it was trained on another base model (its
    marker's ``lora_base``), else None."""
    from stages.lm.checkpoint import MARKER, STEP_DIR

    if not storage.exists(checkpoints):
        return None
    steps = sorted(int(m.group(1)) for n in storage.listdir(checkpoints) if (m := STEP_DIR.match(n)))
    for step in reversed(steps):
        marker = storage.join(checkpoints, f"step-{step}", MARKER)
        if storage.exists(marker):
            got = json.loads(storage.read_text(marker)).get("lora_base")
            return None if got == fingerprint else f"step-{step}"
    return None
