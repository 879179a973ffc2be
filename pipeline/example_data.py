"""Demo data from the Python standard library's own documentation (pydoc): no download needed.

``write_all(DIR)`` writes, from the same documented stdlib members:

- ``corpus/part-0N.jsonl.gz``: one pydoc page per member (pretraining text; pydoc repeats inherited docs,
  which gives natural near-duplicates for the dedupe stage);
- ``code/part-0N.jsonl.gz``: the Python source of those members' modules, one document per module (a
  second pretraining source, for a weighted mixture: ``configs/curation.yaml``);
- ``instruct/{train,val}.jsonl``: "What does `json.dumps` do?" answered by the member's documented summary,
  mostly as chat ``messages``, some as ``prompt``/``completion``;
- ``prefs/{train,val}.jsonl``: the right summary as ``chosen``; as ``rejected`` another module's summary
  (a wrong answer) or, for every other pair, the right summary cut off half-way (an incomplete one);
- ``eval/mc.jsonl``: which of four summaries belongs to a member (held-out members only);
- ``eval/prompts.jsonl``: a dozen held-out questions for greedy generations.

Members are split by a stable hash of their qualified name, so about 10% are held out of every training set.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import os
import pkgutil
import pydoc
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

SYSTEM = "You are a Python documentation assistant."
# Modules whose import has side effects (prints, opens a browser or a window).
_SKIP = {"antigravity", "this", "idlelib", "turtle", "turtledemo", "tkinter", "pydoc_data"}
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->\s*.*)?$")


@dataclass(frozen=True)
class Member:
    """One documented stdlib routine or class."""

    qualname: str
    module: str
    page: str
    summary: str

    @property
    def held_out(self) -> bool:
        return int(hashlib.sha1(self.qualname.encode()).hexdigest(), 16) % 10 == 0


def summary_of(doc: str, limit: int = 300) -> str:
    """The docstring's first real paragraph (not a signature line), whitespace-collapsed, cut at a word."""
    for para in inspect.cleandoc(doc).split("\n\n"):
        text = " ".join(para.split())
        if len(text) >= 20 and not _SIGNATURE.match(text):
            return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."
    return ""


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def render_page(obj: object) -> str:
    """The pydoc text page of ``obj``, with nothing of this machine in it.

    Default values are rendered with ``repr``: ``os.environ`` as a default (``cgi.parse(environ=os.environ)``)
    would write this process's environment variables, secrets included, into the corpus; object addresses
    would make the corpus differ from run to run.
    """
    env_type = type(os.environ)
    saved = env_type.__repr__
    env_type.__repr__ = lambda self: "os.environ"
    try:
        page = pydoc.plain(pydoc.render_doc(obj, renderer=pydoc.plaintext))
    finally:
        env_type.__repr__ = saved
    return _local_paths(_ADDRESS.sub("", page))


def _local_paths(page: str) -> str:
    """This installation's paths (``platform.architecture(executable=sys.executable)``) made generic."""
    paths = {sys.executable: "python", sys.prefix: "<prefix>", sys.base_prefix: "<prefix>",
             os.getcwd(): "<cwd>", os.path.expanduser("~"): "<home>"}
    for path in sorted(paths, key=len, reverse=True):
        if len(path) > 1:
            page = page.replace(path, paths[path])
    return page


def collect_members(max_modules: int = 1000) -> list[Member]:
    """Documented public routines and classes of the first ``max_modules`` importable stdlib modules."""
    wanted = sys.stdlib_module_names - _SKIP
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in wanted and not m.name.startswith("_"))
    names = names[:max_modules]
    members = []
    for name in names:
        try:
            mod = __import__(name)
        except Exception:  # noqa: BLE001 - some stdlib modules cannot import on this platform
            continue
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            doc = getattr(obj, "__doc__", None)
            if attr.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            if not isinstance(doc, str) or len(doc) < 80:
                continue
            page = render_page(obj)
            members.append(Member(f"{name}.{attr}", name, page, summary_of(doc)))
    return members


def write_corpus(out_dir: Path, max_modules: int = 1000, files: int = 4) -> Path:
    """The pretraining corpus only (kept for callers that need just the text)."""
    return _write_corpus(out_dir, collect_members(max_modules), files)


def _write_corpus(out_dir: Path, members: list[Member], files: int = 4) -> Path:
    out = out_dir / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        text = "".join(json.dumps({"id": m.qualname, "text": m.page}) + "\n" for m in members[i::files])
        # mtime=0: the same corpus gives the same bytes (no time stamp in the gzip header).
        (out / f"part-{i:02d}.jsonl.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
    return out


def _write_code(out_dir: Path, members: list[Member], files: int = 2, max_chars: int = 20_000) -> Path:
    """One document per module of ``members`` with a ``.py`` source: its first ``max_chars`` characters,
    cut at a line end (whole standard-library modules would outweigh the pydoc pages many times over)."""
    import importlib.util

    docs = []
    for name in sorted({m.module for m in members}):
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec else None
        if not origin or not origin.endswith(".py"):
            continue
        text = Path(origin).read_text(encoding="utf-8", errors="replace")
        if len(text) > max_chars:
            text = text[: text.rfind("\n", 0, max_chars) + 1]
        docs.append({"id": f"{name}.py", "text": text})
    out = out_dir / "code"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        text = "".join(json.dumps(d) + "\n" for d in docs[i::files])
        (out / f"part-{i:02d}.jsonl.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _question(m: Member) -> str:
    return f"What does `{m.qualname}` do?"


def _instruction(m: Member, i: int) -> dict:
    # A mix of the shapes users bring: plain chat, chat with a system turn, prompt/completion.
    if i % 10 == 9:
        return {"prompt": f"Summarise `{m.qualname}`.", "completion": m.summary}
    messages = [{"role": "user", "content": _question(m)}, {"role": "assistant", "content": m.summary}]
    if i % 4 == 1:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": messages}


def _distractors(m: Member, pool: list[Member], rng: random.Random, k: int) -> list[str]:
    """``k`` distinct summaries of members from other modules, none equal to ``m``'s."""
    picked: list[str] = []
    while len(picked) < k:
        other = rng.choice(pool)
        if other.module != m.module and other.summary != m.summary and other.summary not in picked:
            picked.append(other.summary)
    return picked


def _cut_off(summary: str) -> str | None:
    """The answer stopped half-way through (a classic failure a preference set teaches away from)."""
    words = summary.rstrip(" .").split()
    return " ".join(words[: len(words) // 2]) if len(words) >= 6 else None


def _preference(m: Member, pool: list[Member], rng: random.Random, i: int) -> dict:
    # Two kinds of worse answer: another member's summary (wrong), or this one cut off (incomplete).
    rejected = (_cut_off(m.summary) if i % 2 else None) or _distractors(m, pool, rng, 1)[0]
    if i % 5 == 4:
        return {"prompt": [{"role": "user", "content": _question(m)}],
                "chosen": [{"role": "assistant", "content": m.summary}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    return {"prompt": _question(m), "chosen": m.summary, "rejected": rejected}


def _multiple_choice(m: Member, pool: list[Member], rng: random.Random) -> dict:
    choices = [m.summary, *_distractors(m, pool, rng, 3)]
    rng.shuffle(choices)
    return {"context": f"Which summary belongs to `{m.qualname}`?\nAnswer:",
            "choices": [" " + c for c in choices], "gold": choices.index(m.summary)}


def write_all(out_dir: Path, max_modules: int = 1000, seed: int = 0) -> Path:
    """Corpus, instruction, preference and evaluation sets (see the module docstring)."""
    members = collect_members(max_modules)
    _write_corpus(out_dir, members)
    _write_code(out_dir, members)
    # One example per distinct summary: inherited docs repeat, and a repeat would leak across the split.
    seen: set[str] = set()
    tasks = [m for m in members if m.summary and not (m.summary in seen or seen.add(m.summary))]
    train = [m for m in tasks if not m.held_out]
    held = [m for m in tasks if m.held_out]
    rng = random.Random(seed)
    for split, ms in (("train", train), ("val", held)):
        _write_jsonl(out_dir / f"instruct/{split}.jsonl", [_instruction(m, i) for i, m in enumerate(ms)])
        # Wrong answers come from the same split: a held-out pair must not reuse a training answer.
        pairs = [_preference(m, ms, rng, i) for i, m in enumerate(ms)]
        _write_jsonl(out_dir / f"prefs/{split}.jsonl", pairs)
    _write_jsonl(out_dir / "eval" / "mc.jsonl", [_multiple_choice(m, tasks, rng) for m in held])
    _write_jsonl(out_dir / "eval" / "prompts.jsonl", [{"prompt": _question(m)} for m in held[:12]])
    return out_dir
