"""Demo corpus from the Python standard library's own documentation (pydoc): no download needed."""

from __future__ import annotations

import gzip
import inspect
import json
import pkgutil
import pydoc
from pathlib import Path

MODULES = [m.name for m in pkgutil.iter_modules() if not m.name.startswith("_")]


def write_corpus(out_dir: Path, max_modules: int = 120, files: int = 4) -> Path:
    """One document per documented module member; pydoc repeats inherited docs: natural near-duplicates."""
    out = out_dir / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    docs = []
    for name in sorted(m for m in MODULES if m in __import__("sys").stdlib_module_names)[:max_modules]:
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
            docs.append({"id": f"{name}.{attr}", "text": pydoc.plain(pydoc.render_doc(obj, renderer=pydoc.plaintext))})
    for i in range(files):
        with gzip.open(out / f"part-{i:02d}.jsonl.gz", "wt") as f:
            for d in docs[i::files]:
                f.write(json.dumps(d) + "\n")
    return out
