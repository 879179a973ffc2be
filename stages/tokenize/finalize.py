"""The stage's summary files: ``manifest.json`` (what readers need) and ``stats.json`` (counts).

``manifest.json``: ``format``, ``seq_len``, ``row_len`` (``seq_len + 1``), ``dtype`` (``uint16`` or
``uint32``), ``vocab_size``, ``tokenizer`` (directory, relative), ``tokenizer_sha256`` (of its
``tokenizer.json``), ``special_token_ids`` (``eot``, ``pad``, ``im_start``, ``im_end``), ``rows_per_shard``,
``val_fraction``, ``seed``, ``columns`` (each shard column described) and per split (``train``,
``val``): ``docs``, ``stream_tokens`` (documents' tokens plus one end-of-text each), ``rows``,
``tokens`` (non-padding token slots in all rows; rows overlap by one token) and ``shards``: a list of
``{path, rows, tokens, sha256, bytes}``.
"""

from __future__ import annotations

from typing import Any

from stages.tokenize.config import TokenizeConfig
from stages.tokenize.pack import FORMAT, SplitPlan

COLUMNS = {
    "tokens": "fixed_size_list<dtype>[row_len]: a row of the split's token stream (documents' tokens, each "
              "followed by end-of-text); consecutive rows overlap by one token, so input_ids = tokens[:-1] "
              "and labels = tokens[1:]",
    "length": "int32: real tokens in the row; the rest (only in a split's last row) is the pad id",
    "doc_starts": "list<int32>: positions in the row where a document starts (a document continuing from "
                  "the previous row is not listed)",
}


def build_manifest(config: TokenizeConfig, info: dict[str, Any], plans: dict[str, SplitPlan],
                   enc: list[dict[str, Any]],
                   packed: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """The manifest from the tokenizer info, the split plans, the encode and the pack markers."""
    splits = {}
    for s, plan in plans.items():
        shards = [packed[(s, k)] for k in range(plan.shards)]
        splits[s] = {
            "docs": sum(e["docs"][s] for e in enc), "stream_tokens": plan.stream_tokens, "rows": plan.rows,
            "tokens": sum(sh["tokens"] for sh in shards),
            "shards": [{k: sh[k] for k in ("path", "rows", "tokens", "sha256", "bytes")} for sh in shards],
        }
    return {
        "format": FORMAT, "seq_len": config.seq_len, "row_len": config.seq_len + 1, "dtype": info["dtype"],
        "vocab_size": info["vocab_size"], "tokenizer": "tokenizer", "tokenizer_sha256": info["sha256"],
        "special_token_ids": info["special_token_ids"], "rows_per_shard": config.rows_per_shard,
        "val_fraction": config.val_fraction, "seed": config.seed, "columns": COLUMNS, "splits": splits,
    }


def build_stats(enc: list[dict[str, Any]], manifest: dict[str, Any]) -> dict[str, Any]:
    """Counts for ``stats.json`` and the tracker (no timings: the file must be reproducible)."""
    stats: dict[str, Any] = {
        "files": len(enc), "docs_in": sum(e["docs_in"] for e in enc),
        "docs_rejected": sum(e["docs_rejected"] for e in enc), "docs_cut": sum(e["docs_cut"] for e in enc),
        "vocab_size": manifest["vocab_size"],
    }
    reasons: dict[str, int] = {}
    for e in enc:
        for r, n in e["reject_reasons"].items():
            reasons[r] = reasons.get(r, 0) + n
    for s, sp in manifest["splits"].items():
        row_slots = sp["rows"] * manifest["row_len"]
        stats.update({f"docs_{s}": sp["docs"], f"tokens_{s}": sp["stream_tokens"], f"rows_{s}": sp["rows"],
                      f"shards_{s}": len(sp["shards"]), f"chars_{s}": sum(e["chars"][s] for e in enc),
                      f"pad_tokens_{s}": row_slots - sp["tokens"]})
    stats["docs"] = stats["docs_train"] + stats["docs_val"]
    stats["tokens"] = stats["tokens_train"] + stats["tokens_val"]
    stats["reject_reasons"] = dict(sorted(reasons.items()))
    return stats
