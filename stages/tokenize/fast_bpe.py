"""Byte-level BPE encoded through tiktoken, with exactly the ids HF ``tokenizers`` gives.

tiktoken encodes byte-level BPE several times faster than ``tokenizers`` and accepts custom ranks: the
stage's trained tokenizer becomes ``tiktoken.Encoding(pat_str=GPT-2's, mergeable_ranks=bytes -> id)``.
The two encoders compute the same thing when

- the HF tokenizer is a plain byte-level BPE: no normalizer, the GPT-2 ``ByteLevel`` pre-tokenizer
  (regex on, no prefix space), no dropout, no subword prefix or suffix, no byte fallback;
- every added token is special (the stage encodes special-token text as plain text, as
  ``encode_ordinary`` does) and not a byte-level token;
- every multi-byte token is the result of exactly one merge and ids grow with merge order (tiktoken
  merges the adjacent pair whose concatenation has the lowest rank, HF the pair with the lowest merge
  rank: with rank = id = merge order they pick the same pair);
- every token, BPE-encoded on its own by HF, is that one token (tiktoken looks a whole pre-token up in
  its ranks before merging; HF gets there by merges).

``fast_encoder`` checks all of this and returns ``None`` (with the reason) when any of it fails: the
stage then encodes with ``tokenizers``. Tests compare both encoders' ids on real corpora and on
adversarial text (whitespace runs, emoji, mixed scripts, control characters, lone surrogates, very
long words).
"""

from __future__ import annotations

import functools
import json
from typing import Any

# GPT-2's pre-tokenizer regex in tiktoken's faster, equivalent form (possessive quantifiers; HF's
# ByteLevel uses 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@functools.lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` inverted: the printable character standing for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


class Unsupported(Exception):
    """The tokenizer is not one tiktoken encodes identically (the message says why)."""


def _check_pipeline(spec: dict[str, Any]) -> None:
    if spec.get("normalizer") is not None:
        raise Unsupported("it has a normalizer")
    pre = spec.get("pre_tokenizer") or {}
    want = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    if any(pre.get(k) != v for k, v in want.items()):
        raise Unsupported(f"its pre-tokenizer is not GPT-2's ByteLevel (regex, no prefix space): {pre}")
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise Unsupported(f"its model is {model.get('type')}, not BPE")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise Unsupported(f"its BPE model sets {key}")
    if model.get("byte_fallback"):
        raise Unsupported("its BPE model sets byte_fallback")
    for t in spec.get("added_tokens") or []:
        if not t.get("special"):
            raise Unsupported(f"added token {t.get('content')!r} is not special (it is matched in text)")


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        pairs.append((a, b))
    return pairs


def mergeable_ranks(spec: dict[str, Any]) -> dict[bytes, int]:
    """``bytes -> id`` of the byte-level vocabulary; raises ``Unsupported`` when the ids do not follow the
    merges (see the module docstring)."""
    dec = byte_decoder()
    model = spec["model"]
    specials = {t["content"] for t in spec.get("added_tokens") or []}
    ranks: dict[bytes, int] = {}
    for text, i in model["vocab"].items():
        if text in specials:
            continue
        try:
            raw = bytes(dec[ch] for ch in text)
        except KeyError:
            raise Unsupported(f"vocabulary entry {text!r} is not byte-level") from None
        if raw in ranks:
            raise Unsupported(f"two vocabulary entries spell the bytes {raw!r}")
        ranks[raw] = i
    if any(bytes([b]) not in ranks for b in range(256)):
        raise Unsupported("the vocabulary lacks some of the 256 single bytes")
    produced: set[bytes] = set()
    last = -1
    for a, b in _merge_pairs(model):
        try:
            raw = bytes(dec[ch] for ch in a + b)
        except KeyError:
            raise Unsupported(f"merge {a!r} {b!r} is not byte-level") from None
        i = ranks.get(raw)
        if i is None or raw in produced:
            raise Unsupported(f"merge {a!r} {b!r} gives a token missing from the vocabulary or made twice")
        if i <= last:
            raise Unsupported("token ids do not grow with merge order")
        produced.add(raw)
        last = i
    if len(produced) != sum(len(r) > 1 for r in ranks):
        raise Unsupported("some multi-byte tokens are not made by any merge")
    return ranks


def _check_whole_tokens(tok_json: str, ranks: dict[bytes, int]) -> None:
    """HF's BPE, given a token's characters alone, must give that token back (tiktoken's shortcut)."""
    from tokenizers import Tokenizer

    model = Tokenizer.from_str(tok_json).model
    enc = {b: ch for ch, b in byte_decoder().items()}
    for raw, i in ranks.items():
        if len(raw) > 1:
            got = [t.id for t in model.tokenize("".join(enc[b] for b in raw))]
            if got != [i]:
                raise Unsupported(f"HF's BPE encodes the token {raw!r} (id {i}) as {got}")


def build(tok_json: str, check_tokens: bool = True) -> Any:
    """The ``tiktoken.Encoding`` of a HF ``tokenizer.json``; raises ``Unsupported`` with the reason."""
    try:
        import tiktoken
    except ImportError:
        raise Unsupported("tiktoken is not installed") from None
    spec = json.loads(tok_json)
    _check_pipeline(spec)
    ranks = mergeable_ranks(spec)
    if check_tokens:
        _check_whole_tokens(tok_json, ranks)
    return tiktoken.Encoding("seedline-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})


def fast_encoder(tok_json: str) -> tuple[Any | None, str]:
    """``(tiktoken.Encoding, "")`` when it encodes exactly like the HF tokenizer, else ``(None, reason)``."""
    try:
        return build(tok_json), ""
    except Unsupported as e:
        return None, str(e)
