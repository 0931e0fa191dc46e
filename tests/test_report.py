"""The report's side-by-side examples are chosen by fixed rules, not by hand or by file order."""

import json
import random

from lastmile import report


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


def test_identical_summaries_are_not_shown_as_differences(tmp_path):
    """Where RL and MLE wrote the same summary there is no difference to show (PPO published iteration
    0, say): only the examples that changed are listed, and a report where none did says so."""
    _samples(tmp_path, [f"p{i}" for i in range(8)])
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    for r in rows:
        if r["id"] != "p4":
            r["rl"], r["rougeL"]["rl"] = r["mle"], r["rougeL"]["mle"]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    differ_part = report._examples(tmp_path).split("## The one example where RL and MLE differ in ROUGE-L")[1]
    assert [line[4:] for line in differ_part.splitlines() if line.startswith("### ")] == ["p4"]

    for r in rows:
        r["rl"], r["rougeL"]["rl"] = r["mle"], r["rougeL"]["mle"]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    md = report._examples(tmp_path)
    assert "differ most" not in md and "RL's summary is the same as MLE's on all 8 examples" in md
