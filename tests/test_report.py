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


def test_reward_scores_of_fixed_summaries_packed_per_paper_equal_one_row_each():
    """The report scores every system's summary of a paper in one shared-prefix row (the abstract once):
    the same scores, to float rounding, as one right-padded row per summary (what it did before), empty
    summaries included (read at the prompt's end)."""
    import tempfile
    from types import SimpleNamespace

    import torch
    from conftest import TINY
    from lastmile.config import load_config
    from lastmile.models import ScalarRewardModel, load_causal_lm, load_reward_backbone
    from lastmile.rollout import RolloutModels, fixed_rollout, reward_model_scores
    from lastmile.stages.reward_model import collate_sequences

    cfg = load_config(TINY)
    lm, _ = load_causal_lm(cfg.model, torch.device("cpu"), seed=0)
    with tempfile.TemporaryDirectory() as d:
        lm.save_pretrained(d)
        rm = ScalarRewardModel(load_reward_backbone(cfg.model, d, torch.device("cpu"), 0, seed=1)[0]).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [tuple(torch.randint(10, 1000, (n,), generator=g).tolist()) for n in (9, 5, 7)]
    summaries = [[tuple(torch.randint(10, 1000, (n,), generator=g).tolist()) for n in lengths]
                 for lengths in ((4, 6, 0, 3), (2, 2, 5, 1), (7, 0, 3, 3))]  # 4 systems per paper
    rows = [(i, j) for i in range(3) for j in range(4)]
    rollout = fixed_rollout([i for i, _ in rows], [prompts[i] for i, _ in rows], [summaries[i][j] for i, j in rows], 0)
    tok = SimpleNamespace(eos_token_id=0, pad_token_id=0)

    def scores(shared: bool, micro: int) -> torch.Tensor:
        models = RolloutModels(actor=None, actor_engine=None, ref=None, rm=rm, critic=None, tokenizer=tok, rm_stats={},
                               device=torch.device("cpu"), precision="fp32", micro_batch=micro, shared_prefix=shared)
        return reward_model_scores(rm, rollout, models)

    ids, mask = collate_sequences([prompts[i] + summaries[i][j] for i, j in rows], 0)
    with torch.no_grad():
        one_row_each = rm(ids, mask)
    assert one_row_each.std() > 0
    for shared, micro in ((True, 4), (True, 8), (False, 8)):
        assert (scores(shared, micro) - one_row_each).abs().max() < 1e-5, (shared, micro)
