"""Decontamination: remove training documents that share a word n-gram with an evaluation item.

Evaluation items are read from JSONL files in the formats of the evaluate, sft and dpo stages:
multiple-choice ``{context, choices}``, prompts ``{prompt[, completion]}``, chat ``{messages}`` (system
messages skipped: they repeat across items) and preference ``{prompt, chosen, rejected}``. Each text is
normalised to lower-case word characters; its n-grams (``ngram`` words, 13 as in GPT-3) are the keys, and a
text shorter than that but at least ``min_words`` long is one key as a whole. The index is a sorted key
array with the evaluation set (file) of each key; it is built once by the driver and stored in the stage's
``work/`` as ``.npz`` (read back without pickle).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.errors import ConfigError
from stages.common.records import expand_inputs
from stages.filter.config import Decontaminate
from stages.filter.ngrams import substring_keys

_WORD = re.compile(r"\w+")


def normal_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def gram_keys(words: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, start word index) of every n-word window of ``words``."""
    m = len(words) - n + 1
    if m <= 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    lens = np.fromiter((len(w) for w in words), np.int64, len(words))
    starts = np.concatenate([[0], np.cumsum(lens + 1)[:-1]])
    ends = starts + lens
    return substring_keys(" ".join(words), starts[:m], ends[n - 1:]), np.arange(m)


def item_texts(obj: Any) -> list[str]:
    """The texts of one evaluation record (see the module docstring for the formats)."""
    if not isinstance(obj, dict):
        return []
    out: list[str] = []
    for key in ("context", "question", "prompt", "completion", "answer", "chosen", "rejected"):
        v = obj.get(key)
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            out.extend(_message_texts(v))
    choices = obj.get("choices")
    if isinstance(choices, list):
        out.extend(c for c in choices if isinstance(c, str))
    if isinstance(obj.get("messages"), list):
        out.extend(_message_texts(obj["messages"]))
    return out


def _message_texts(messages: list) -> list[str]:
    return [m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)
            and m.get("role") != "system"]


@dataclass
class Index:
    """Sorted n-gram keys and the evaluation set of each; ``lengths`` are the window sizes to look up."""

    keys: np.ndarray
    sets: np.ndarray
    names: list[str]
    lengths: list[int]

    def save(self, npz_path: str, json_path: str) -> None:
        buf = io.BytesIO()
        np.savez(buf, keys=self.keys, sets=self.sets)
        with storage.open_atomic(npz_path, "wb") as f:
            f.write(buf.getvalue())
        storage.write_json(json_path, {"names": self.names, "lengths": self.lengths})

    @classmethod
    def load(cls, npz_path: str, json_path: str) -> Index:
        meta = storage.read_json(json_path)
        with np.load(io.BytesIO(storage.read_bytes(npz_path)), allow_pickle=False) as z:
            return cls(z["keys"], z["sets"], meta["names"], meta["lengths"])

    def match(self, text: str) -> tuple[int, str, str] | None:
        """(matching windows, evaluation set of the first, its words) or None when clean."""
        words = normal_words(text)
        hits, first = 0, None
        for n in self.lengths:
            keys, starts = gram_keys(words, n)
            if not len(keys) or not len(self.keys):
                continue
            pos = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
            found = self.keys[pos] == keys
            if found.any():
                hits += int(found.sum())
                i = int(np.argmax(found))
                if first is None or starts[i] < first[0]:
                    first = (int(starts[i]), n, int(self.sets[pos[i]]))
        if first is None:
            return None
        s, n, set_id = first
        return hits, self.names[set_id], " ".join(words[s:s + n])


def eval_sets(cfg: Decontaminate, pipeline_eval: dict[str, list[str]]) -> dict[str, list[str]]:
    """``{evaluation set: [file, ...]}``: each file of ``eval_files`` is a set of its own (named by its path
    relative to the glob); without ``eval_files``, each of the pipeline's evaluation-data fields is one set
    named by its key path (``evaluate.tasks.0.path``)."""
    key = "stages.filter.decontaminate.eval_files"
    if cfg.eval_files is not None:
        return {f.rel: [f.path] for f in expand_inputs(cfg.eval_files, key)}
    if not pipeline_eval:
        raise ConfigError(key, "the pipeline has no evaluation data (evaluate tasks or prompts, sft or dpo "
                               "val) to decontaminate against; name eval_files")
    return {name: [f.path for f in expand_inputs(globs, name)]
            for name, globs in sorted(pipeline_eval.items())}


def build_index(cfg: Decontaminate, sets: dict[str, list[str]]) -> tuple[Index, dict[str, dict[str, int]]]:
    """Read every evaluation file of ``sets`` (see ``eval_sets``); returns the index and per-set counts
    (items, keys)."""
    all_keys, all_sets, lengths = [], [], {cfg.ngram}
    stats: dict[str, dict[str, int]] = {}
    for set_id, (name, paths) in enumerate(sets.items()):
        items = n_keys = 0
        for path in paths:
            items, n_keys = _read_items(cfg, path, set_id, (items, n_keys), all_keys, all_sets, lengths)
        stats[name] = {"items": items, "ngrams": n_keys}
    keys = np.concatenate(all_keys) if all_keys else np.empty(0, np.uint64)
    sets_arr = np.concatenate(all_sets) if all_sets else np.empty(0, np.int32)
    order = np.lexsort((sets_arr, keys))  # by key, then the first evaluation set
    keys, sets_arr = keys[order], sets_arr[order]
    first = np.concatenate([[True], keys[1:] != keys[:-1]]) if len(keys) else np.empty(0, bool)
    return Index(keys[first], sets_arr[first], list(sets), sorted(lengths)), stats


def _read_items(cfg: Decontaminate, path: str, set_id: int, counts: tuple[int, int], all_keys: list,
                all_sets: list, lengths: set[int]) -> tuple[int, int]:
    """Add the n-gram keys of one evaluation file; returns the updated (items, keys) counts."""
    items, n_keys = counts
    for line_no, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError("stages.filter.decontaminate.eval_files",
                              f"{path} line {line_no}: invalid JSON ({e.msg})") from None
        items += 1
        for text in item_texts(obj):
            words = normal_words(text)
            if len(words) >= cfg.ngram:
                keys, _ = gram_keys(words, cfg.ngram)
            elif len(words) >= cfg.min_words:
                keys, _ = gram_keys(words, len(words))
                lengths.add(len(words))
            else:
                continue
            all_keys.append(keys)
            all_sets.append(np.full(len(keys), set_id, np.int32))
            n_keys += len(keys)
    return items, n_keys
