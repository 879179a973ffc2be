"""The tokenize stage's section of the run report (its registered ``report`` hook)."""

from __future__ import annotations

from pipeline import storage
from pipeline.report import _e, _num, _table


def section(instance: str, d: str, dirs: dict[str, str] | None = None) -> str:
    """The tokenize stage's part of ``report.html``: splits, tokens, rows and shards."""
    manifest = storage.read_json_or(storage.join(d, "manifest.json"), None)
    if not manifest:
        return ""
    rows = [
        [
            _e(split),
            _num(s.get("docs")),
            _num(s.get("stream_tokens")),
            _num(s.get("rows")),
            _num(len(s.get("shards", []))),
        ]
        for split, s in manifest.get("splits", {}).items()
    ]
    info = (
        f"<p>vocabulary {_num(manifest.get('vocab_size'))}, sequence length {_num(manifest.get('seq_len'))}, "
        f"tokenizer sha256 <code>{_e(manifest.get('tokenizer_sha256', '?'))}</code></p>"
    )
    header = ["split", "documents", "tokens", "rows", "shards"]
    return f"<h2>Tokens: {_e(instance)}</h2>" + info + _table(header, rows)
