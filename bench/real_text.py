"""Real documents from this machine for the filter benchmark and parity tests (no download).

A deterministic mix of three kinds of text that exercise different rules: Debian package documentation
(``/usr/share/doc``: READMEs, changelogs, copyright files; prose, lists, repeated lines), the standard
library's module docstrings (documentation prose) and the standard library's Python sources (code: curly
brackets, symbols, short lines).
"""

from __future__ import annotations

import gzip
import hashlib
import sysconfig
from pathlib import Path

MAX_CHARS = 20_000


def _read(path: Path) -> str | None:
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None
    text = text[:MAX_CHARS]
    return text if text.strip() else None


def _pick(paths: list[Path], n: int) -> list[str]:
    """Up to ``n`` readable texts, chosen by a hash of the path (stable across machines' file order)."""
    ranked = sorted(paths, key=lambda p: hashlib.sha1(str(p).encode()).hexdigest())
    out: list[str] = []
    for p in ranked:
        t = _read(p)
        if t is not None:
            out.append(t)
            if len(out) >= n:
                break
    return out


def doc_texts(n: int) -> list[str]:
    root = Path("/usr/share/doc")
    paths = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
             and (p.suffix in (".gz", ".txt", ".md", "") or p.name.startswith("README"))
             and p.stat().st_size > 200]
    return _pick(paths, n)


def python_sources(n: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return _pick([p for p in root.rglob("*.py") if "test" not in p.parts and p.stat().st_size > 200], n)


def docstrings(n: int) -> list[str]:
    """Module docstrings of standard library sources (prose), read without importing anything."""
    import ast

    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for p in sorted(root.rglob("*.py"), key=lambda p: hashlib.sha1(str(p).encode()).hexdigest()):
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in [tree, *[x for x in tree.body if isinstance(x, (ast.ClassDef, ast.FunctionDef))]]:
            doc = ast.get_docstring(node)
            if doc and len(doc) > 200:
                out.append(doc[:MAX_CHARS])
        if len(out) >= n:
            break
    return out[:n]


def real_documents(n: int = 3000) -> list[str]:
    """About ``n`` documents: package docs, docstrings and Python sources, interleaved."""
    third = n // 3
    kinds = [doc_texts(third), docstrings(third), python_sources(n - 2 * third)]
    out: list[str] = []
    for i in range(max(len(k) for k in kinds)):
        out.extend(k[i] for k in kinds if i < len(k))
    return out
