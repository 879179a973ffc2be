"""The ``lora:`` section of the fine-tuning stages (sft, dpo); torch-free.

Module names are Hugging Face Llama's (what PEFT users write for a ``LlamaForCausalLM``): the adapter that
training saves loads with ``peft.PeftModel.from_pretrained`` on the exported base under the same names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.stage import StrictModel

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION + MLP  # every linear layer of a decoder block (PEFT's "all-linear" for Llama)
SAVABLE = ("lm_head", "embed_tokens")  # whole modules trained alongside the adapters


class LoraSpec(StrictModel):
    """Low-rank adapters (Hu et al. 2021) on the decoder blocks' linear layers: ``W x + (alpha / rank)
    B A dropout(x)`` with A (rank x in) and B (out x rank, zero at the start); the base stays frozen and
    only A, B (and ``modules_to_save``) are trained."""

    rank: int = Field(16, ge=1, le=4096, description="r: inner dimension of each adapter")
    alpha: float = Field(32.0, gt=0, description="scaling numerator: updates are scaled by alpha / rank")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapters' input (training)")
    targets: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                  "down_proj) or 'all-linear'")
    modules_to_save: list[str] = Field(
        [], description="whole modules trained and saved with the adapter: lm_head, embed_tokens")

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, str):
            return v
        if not v:
            raise ValueError("name at least one module, or 'all-linear'")
        unknown = [t for t in v if t not in TARGETS]
        if unknown:
            raise ValueError(f"no module named {', '.join(map(repr, unknown))} in the model; its linear "
                             f"layers are {', '.join(TARGETS)} (or use 'all-linear')")
        return sorted(set(v), key=TARGETS.index)

    @field_validator("modules_to_save")
    @classmethod
    def _known_modules(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in SAVABLE]
        if unknown:
            raise ValueError(f"cannot save {', '.join(map(repr, unknown))}: choose from {', '.join(SAVABLE)}")
        return sorted(set(v), key=SAVABLE.index)

    def target_names(self) -> tuple[str, ...]:
        """The adapted module names, in block order."""
        return TARGETS if self.targets == "all-linear" else tuple(self.targets)


def check_lora_model(spec: LoraSpec | None, model_dir: str, stage: str) -> None:
    """Before any work: ``spec`` fits the model in ``model_dir`` (a tied model has no separate lm_head or
    embedding to save); raises ``ConfigError`` naming the key."""
    from pipeline import storage
    from pipeline.errors import ConfigError

    if spec is None or not spec.modules_to_save:
        return
    hf = storage.read_json(storage.join(model_dir, "config.json"))
    if hf.get("tie_word_embeddings", False):
        raise ConfigError(f"stages.{stage}.lora.modules_to_save",
                          f"the model in {model_dir} ties its embedding and output layer: "
                          f"{', '.join(spec.modules_to_save)} cannot be trained apart from the other")
