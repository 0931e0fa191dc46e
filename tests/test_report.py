"""The report's side-by-side examples are chosen by fixed rules, not by hand or by file order."""

import json
import random

from trainer import report


def _samples(folder, ids):
    rows = []
    for ex_id in ids:
        rows.append({"id": ex_id, "reference": f"ref {ex_id}", "mle": f"mle {ex_id}", "rl": f"rl {ex_id}",
                     "rougeL": {"mle": 0.5, "rl": 0.5 + (0.4 if ex_id == "p7" else 0.01 * (int(ex_id[1:]) % 3))}})
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_drawn_examples_are_the_smallest_hashes_whatever_the_file_order(tmp_path):
    ids = [f"p{i}" for i in range(25)]
    _samples(tmp_path, ids)
    md = report._examples(tmp_path)
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    _samples(tmp_path, shuffled)
    assert report._examples(tmp_path).split("## The ")[0] == md.split("## The ")[0]  # same draw, same order

    drawn_part, differ_part = md.split("## The 5 examples where RL and MLE differ most")
    drawn = [line[4:] for line in drawn_part.splitlines() if line.startswith("### ")]
    assert drawn == sorted(ids, key=report.drawn_key)[: report.DRAWN]
    differ = [line[4:] for line in differ_part.splitlines() if line.startswith("### ")]
    assert len(differ) == report.EXAMPLES and differ[0] == "p7"  # the largest |RL - MLE| first
    assert "- **rl** (ROUGE-L 0.900): rl p7" in differ_part


def test_no_examples_without_both_systems(tmp_path):
    (tmp_path / "samples.jsonl").write_text(json.dumps({"id": "a", "reference": "r", "mle": "m",
                                                        "rougeL": {"mle": 0.1}}) + "\n", encoding="utf-8")
    assert report._examples(tmp_path) == ""
