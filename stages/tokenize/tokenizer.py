"""Building the stage's tokenizer: train a byte-level BPE, or load one; save it as a HF directory.

Every Seedline tokenizer has the special tokens of ``config.SPECIAL_TOKENS`` (end-of-text, padding and
the ChatML tokens of the sft stage). A trained tokenizer has them as ids 0-3; a loaded one that lacks
some gets them appended. Training is deterministic: the same sample gives the same ``tokenizer.json``
bytes (HF ``tokenizers`` breaks merge ties by token ids, not by hash order), so a resumed run is
byte-identical.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline import storage
from pipeline.errors import ConfigError
from stages.tokenize.config import EOT, IM_END, IM_START, PAD, SPECIAL_TOKENS, TrainTokenizer

# ChatML, the format the sft stage renders conversations in.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


def train_bpe(texts: Iterable[str], spec: TrainTokenizer) -> Tokenizer:
    """A byte-level BPE (GPT-2 pre-tokenization, no normalizer: decoding gives back the exact text)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, min_frequency=spec.min_frequency, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS.values()), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load(path: str) -> Tokenizer:
    """A ``tokenizer.json`` file, or a directory holding one; the special tokens are added if missing."""
    file = path if path.endswith(".json") else storage.join(path, "tokenizer.json")
    try:
        text = storage.read_text(file)
    except FileNotFoundError:
        raise ConfigError("stages.tokenize.tokenizer.path",
                          f"{file} not found (give a tokenizer.json or a directory with one)") from None
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:
        raise ConfigError("stages.tokenize.tokenizer.path",
                          f"{file} is not a valid tokenizer.json: {e}") from e
    missing = [t for t in SPECIAL_TOKENS.values() if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """``{"eot": id, "pad": id, "im_start": id, "im_end": id}``."""
    return {name: int(tok.token_to_id(t)) for name, t in SPECIAL_TOKENS.items()}


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` for ``transformers.PreTrainedTokenizerFast`` (bos is end-of-text)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": PAD,
        "additional_special_tokens": [IM_START, IM_END],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def save(tok: Tokenizer, out_dir: str, model_max_length: int) -> str:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (atomically); returns the sha256 of the former.

    Written by hand rather than by ``save_pretrained`` so that the bytes do not depend on the installed
    ``transformers`` version.
    """
    data = tok.to_str(pretty=True).encode("utf-8")
    storage.write_bytes(storage.join(out_dir, "tokenizer.json"), data)
    cfg = json.dumps(tokenizer_config(model_max_length), indent=2, sort_keys=True) + "\n"
    storage.write_text(storage.join(out_dir, "tokenizer_config.json"), cfg)
    return hashlib.sha256(data).hexdigest()


def vocab_size(tok: Tokenizer) -> int:
    """Ids run from 0 to vocab_size - 1 (added tokens included; a loaded vocabulary may have holes)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def token_dtype(vocab: int) -> str:
    """``uint16`` when every id fits, else ``uint32``."""
    return "uint16" if vocab <= 1 << 16 else "uint32"
