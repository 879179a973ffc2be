"""The MLflow ``pyfunc`` flavour of a Seedline model: the exported Hugging Face directory as an artifact.

``mlflow.pyfunc.load_model("models:/<name>@candidate")`` gives a model whose ``predict`` generates
(greedy) continuations of prompts; ``unwrap_python_model()`` exposes the ``CausalLM`` (``.model``) and the
tokenizer (``.tokenizer``) for log-likelihoods and logits. The artifact is a plain ``LlamaForCausalLM``
directory, so ``transformers.AutoModelForCausalLM.from_pretrained(<artifact dir>)`` loads it too.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc

from stages.tokenize.config import EOT, IM_END, IM_START


class SeedlineLM(mlflow.pyfunc.PythonModel):
    """Greedy text generation with a ``CausalLM`` (params: ``max_new_tokens``, ``chat``)."""

    def load_context(self, context: Any) -> None:
        from pathlib import Path

        from tokenizers import Tokenizer

        from stages.lm.hf import import_hf

        root = Path(context.artifacts["model"])
        self.model = import_hf(str(root)).eval()
        self.tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        self.stops = [
            i for i in (self.tokenizer.token_to_id(IM_END), self.tokenizer.token_to_id(EOT)) if i is not None
        ]

    def logits(self, text: str):
        """(T, V) next-token logits at every position of ``text``."""
        import torch

        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        with torch.no_grad():
            return self.model(torch.tensor([ids])).logits[0]

    def predict(
        self, context, model_input, params=None
    ):  # no type hints: MLflow would turn them into a schema
        """Prompts (a list of strings, a string, or a one-column DataFrame) -> generated texts."""
        params = params or {}
        max_new = int(params.get("max_new_tokens", 32))
        chat = bool(params.get("chat", False))
        if isinstance(model_input, str):
            prompts = [model_input]
        elif hasattr(model_input, "columns"):
            prompts = [
                str(p)
                for p in model_input["prompt" if "prompt" in model_input.columns else model_input.columns[0]]
            ]
        else:
            prompts = [str(p) for p in model_input]
        texts = [f"{IM_START}user\n{p}{IM_END}\n{IM_START}assistant\n" if chat else p for p in prompts]
        ids = [self.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
        keep = max(1, self.model.cfg.max_seq_len - max_new)
        new = self.model.generate([i[-keep:] for i in ids], max_new, stop_tokens=self.stops)
        return [self.tokenizer.decode([t for t in n if t not in self.stops]) for n in new]
