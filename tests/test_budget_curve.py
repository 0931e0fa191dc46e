"""bench/budget_curve.py: episodes and hours from a PPO stage folder, finished or still running."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import budget_curve  # noqa: E402


def _eval(it: int, la: float, sem: float | None = None) -> dict:
    e = {"iteration": it, "eval/policy/la_rougeL": la, "eval/policy/rougeL": la + 0.05,
         "eval/policy/length_ratio": 1.0, "samples": []}
    if sem is not None:
        e["eval/policy/semantic"] = sem
    return e


def _stage(tmp_path: Path, *, finished: bool) -> Path:
    stage = tmp_path / "ppo"
    stage.mkdir()
    (stage / "config.yaml").write_text(yaml.safe_dump({"ppo": {"prompts_per_iteration": 4, "samples_per_prompt": 4}}))
    history = [{"iteration": i, "time/iteration_s": 1800.0} for i in range(1, 5)]  # half an hour each
    evals = [_eval(0, 0.20, 0.70), _eval(2, 0.22, 0.71), _eval(4, 0.23, 0.72)]
    if finished:
        (stage / "history.json").write_text(json.dumps({"evals": evals, "history": history}))
    else:  # killed after iteration 2's save: only the checkpoint's trainer state holds the curve so far
        for step, upto in ((1, 1), (2, 2)):
            d = stage / "checkpoints" / f"step-{step:07d}"
            d.mkdir(parents=True)
            (d / budget_curve.STATE_FILE).write_text(json.dumps(
                {"evals": [e for e in evals if e["iteration"] <= upto], "history": history[:upto]}))
    return stage


def test_finished_run_episodes_hours_and_plot(tmp_path):
    stage = _stage(tmp_path, finished=True)
    pts = budget_curve.curve(stage)
    assert [(p.iteration, p.episodes) for p in pts] == [(0, 0), (2, 32), (4, 64)]  # 4 prompts x 4 samples
    assert [p.hours for p in pts] == [0.0, 1.0, 2.0]
    assert [p.semantic for p in pts] == [0.70, 0.71, 0.72]
    out = tmp_path / "curve.png"
    assert budget_curve.main([f"{stage}:RLOO", "--plot", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert "| 32 | 2 | 1.00 | 0.2200 | 0.2700 | 0.7100 | 1.00 |" in budget_curve.table("RLOO", pts)


def test_running_run_reads_the_newest_checkpoint(tmp_path):
    pts = budget_curve.curve(_stage(tmp_path, finished=False))
    assert [(p.iteration, p.episodes, p.hours) for p in pts] == [(0, 0, 0.0), (2, 32, 1.0)]


def test_not_a_ppo_folder_is_one_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="no config.yaml"):
        budget_curve.main([str(tmp_path)])
    (tmp_path / "config.yaml").write_text("ppo: {prompts_per_iteration: 1, samples_per_prompt: 1}\n")
    with pytest.raises(SystemExit, match="neither history.json nor a checkpoint"):
        budget_curve.curve(tmp_path)


def test_iterations_held_up_far_beyond_the_median_are_named_with_their_hours(tmp_path, capsys):
    stage = tmp_path / "ppo"
    stage.mkdir()
    (stage / "config.yaml").write_text(yaml.safe_dump({"ppo": {"prompts_per_iteration": 4, "samples_per_prompt": 4}}))
    times = {1: 30.0, 2: 700.0, 3: 28.0, 4: 31.0, 5: 250.0}  # 2 paused (23x the median 31 s); 5 only 8x
    history = [{"iteration": i, "time/iteration_s": t} for i, t in times.items()]
    (stage / "history.json").write_text(json.dumps({"evals": [_eval(0, 0.2), _eval(5, 0.21)], "history": history}))
    assert budget_curve.slow_iterations(history).seconds == {2: 700.0}
    assert budget_curve.main([f"{stage}:RLOO"]) == 0
    # 700 s = 0.19 h, of which 700 - 31 = 669 s = 0.19 h beyond the median
    assert ("RLOO: iterations over 10x the median wall time (31.0 s): 2 (700 s); "
            "they hold 0.19 h of the hours column, 0.19 h beyond the median") in capsys.readouterr().out
    assert budget_curve.slow_iterations([]).seconds == {}
