"""The dedupe section of report.html: statistics grouped by what they describe, with units."""

import json
import re

from stages.dedupe.report_section import section


def test_statistics_are_grouped_with_units_and_unknown_keys_kept(tmp_path):
    stats = {"docs_in": 1359, "docs_rejected": 0, "docs_good": 1359, "exact_duplicates": 130,
             "near_duplicates": 16, "docs_out": 1213, "text_bytes_in": 2036793, "bytes_out": 661158,
             "shards": 4, "lsh_bands": 16, "lsh_rows": 8, "candidate_pairs": 80, "components": 93,
             "new_counter": 7, "reject_reasons": {}}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    page = section("dedupe", str(tmp_path))
    rows = [re.findall(r"<td>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", page)[1:]]
    groups = [r[0] for r in rows if r[0]]
    assert groups == ["<b>Documents</b>", "<b>Text</b>", "<b>Near-duplicate search (MinHash LSH)</b>",
                      "<b>Other</b>"]
    values = {r[1]: r[2] for r in rows}
    assert values["read"] == "1,359 documents" and values["kept"] == "1,213 documents"
    assert values["near duplicates removed"] == "16 documents"
    assert values["text read"] == "2.04 MB" and values["output files (with ids and metadata)"] == "0.66 MB"
    assert values["bands"] == "16" and values["candidate pairs from LSH buckets"] == "80 pairs"
    assert values["new_counter"] == "7"  # a statistic the report does not know yet is still shown
    assert "1,213 of 1,359 documents kept (89.3%)" in page
