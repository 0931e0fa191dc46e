"""report.goals: checked when the config loads, read off the report's results line by line (hand values)."""

from pathlib import Path

import pytest

from lastmile import goals
from lastmile.config import GoalConfig, load_config
from lastmile.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

RESULTS = {
    "systems": {"rl": {"rouge1": 0.44, "unfinished_share": 0.125}, "mle": {"rouge1": 0.43}},
    "comparisons": {
        "rl - mle": {"la_rougeL": {"mean_diff": 0.012, "ci_low": 0.002, "ci_high": 0.021},
                     "rougeL": {"mean_diff": -0.004, "ci_low": -0.011, "ci_high": -0.0005}},
        "rl - best-of-n": {"semantic": {"mean_diff": -0.003, "ci_low": -0.010, "ci_high": 0.0}},
    },
}


def _line(**kw):
    return goals.check([GoalConfig(name="g", **kw)], RESULTS)[0]


def test_comparison_lines_read_the_interval_and_the_mean():
    up = _line(compare="rl - mle", metric="la_rougeL", test="above_zero")
    assert up.met is True and up.numbers == "+0.0120 [+0.0020, +0.0210]"
    assert _line(compare="rl - mle", metric="la_rougeL", test="diff_at_least", value=0.02).met is False
    assert _line(compare="rl - mle", metric="la_rougeL", test="diff_at_least", value=0.012).met is True
    # a ROUGE-L drop the interval supports (high end below 0): "no drop" is not met, nor is a gain
    assert _line(compare="rl - mle", metric="rougeL", test="reaches_zero").met is False
    assert _line(compare="rl - mle", metric="rougeL", test="above_zero").met is False
    # an interval ending exactly at 0 reaches 0 (no supported loss) but is not above it
    assert _line(compare="rl - best-of-n", metric="semantic", test="reaches_zero").met is True
    assert _line(compare="rl - best-of-n", metric="semantic", test="above_zero").met is False


def test_system_lines_and_what_was_not_measured():
    assert _line(system="rl", metric="rouge1", test="at_least", value=0.438).met is True
    assert _line(system="mle", metric="rouge1", test="at_least", value=0.438).met is False
    assert _line(system="rl", metric="unfinished_share", test="at_most", value=0.1).met is False
    missing = [_line(system="best-of-n", metric="rouge1", test="at_least", value=0.4),
               _line(compare="rl - mle", metric="reward", test="above_zero")]
    assert all(x.met is None and x.numbers == "not measured" for x in missing)


def test_markdown_prints_every_line_with_its_verdict():
    lines = goals.check([GoalConfig(name="RL beats MLE", compare="rl - mle", metric="la_rougeL"),
                         GoalConfig(name="BART's score", system="rl", metric="rouge1", test="at_least", value=0.45),
                         GoalConfig(name="reward up", compare="rl - mle", metric="reward")], RESULTS)
    md = goals.markdown(lines).splitlines()
    assert md[0] == "## The goal, line by line"
    assert "| RL beats MLE | rl - mle la_rougeL: 95% interval above 0 | +0.0120 [+0.0020, +0.0210] | **met** |" in md
    assert "| BART's score | rl rouge1: at least 0.45 | 0.4400 | **not met** |" in md
    assert "| reward up | rl - mle reward: 95% interval above 0 | not measured | **not measured** |" in md
    assert goals.markdown([]) == ""


def _problems(*goal_yaml: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"report.goals=[{', '.join(goal_yaml)}]"])
    return str(e.value)


def test_a_bad_goal_is_refused_when_the_config_loads_naming_the_line_and_the_fix():
    msg = _problems("{name: a, compare: rl - sft}")
    assert "report.goals[0].compare (rl - sft) is not a comparison this config's report makes" in msg
    assert "rl - mle" in msg
    msg = _problems("{name: a, compare: rl - mle, system: rl}", "{name: b, system: rl, test: above_zero}",
                    "{name: c, compare: rl - mle, metric: bleu}", "{name: '', system: rl, test: at_least}")
    assert "report.goals[0] needs exactly one of compare" in msg
    assert "report.goals[1].test (above_zero) does not apply to a system" in msg
    assert "report.goals[2].metric (bleu) is not compared by this config's report. Use one of: rouge1" in msg
    assert "report.goals[3].name is empty" in msg
    # best-of-n is a system of the report only when best_of_n.in_pipeline is set
    msg = _problems("{name: a, compare: rl - best-of-n}")
    assert "report.goals[0].compare (rl - best-of-n) is not a comparison" in msg
    load_config(None, ["report.goals=[{name: a, compare: rl - best-of-n}]", "best_of_n.in_pipeline=true"])
    # a misspelt key and a goal that is not a mapping, in the house template
    msg = _problems("{name: a, comapre: rl - mle}", "rl - mle")
    assert "report.goals[0].comapre is not a known setting. Did you mean 'report.goals[0].compare'?" in msg
    assert "report.goals[1] ('rl - mle') must be a mapping of settings." in msg
    with pytest.raises(ConfigError, match=r"report.goals \(3\) must be a list of mappings"):
        load_config(None, ["report.goals=3"])


def test_a_semantic_goal_is_refused_when_semantic_similarity_is_off():
    load_config(None, ["report.goals=[{name: a, compare: rl - mle, metric: semantic}]"])  # minilm: accepted
    with pytest.raises(ConfigError, match=r"report.goals\[0\].metric \(semantic\) is not compared by this config's "
                                          r"report \(eval.semantic_model is none\)"):
        load_config(None, ["report.goals=[{name: a, compare: rl - mle, metric: semantic}]", "eval.semantic_model=none"])


def test_goals_change_no_identity_and_survive_the_written_config(tmp_path):
    """Goals change what is read off the results, never a stage or the evaluation; a stage's config.yaml
    with goals loads back as the same config."""
    from lastmile.config import to_yaml
    from lastmile.stages.common import stage_identity
    from lastmile.stages.evaluate import _identity

    with_goals = load_config(ROOT / "trainer" / "configs" / "tiny.yaml")
    without = load_config(ROOT / "trainer" / "configs" / "tiny.yaml", ["report.goals=[]"])
    assert with_goals.report.goals and not without.report.goals
    for stage in ("sft", "reward_model", "best_of_n", "ppo"):
        assert stage_identity(with_goals, stage, {})["hash"] == stage_identity(without, stage, {})["hash"]
    assert _identity(with_goals, [], []) == _identity(without, [], [])
    written = tmp_path / "config.yaml"
    written.write_text(to_yaml(load_config(ROOT / "trainer" / "configs" / "scitldr_v2.yaml", ["data.source=aclsum"])))
    again = load_config(written)
    assert again.report.goals == load_config(ROOT / "trainer" / "configs" / "scitldr_v2.yaml",
                                             ["data.source=aclsum"]).report.goals
    assert len(again.report.goals) == 7 and again.report.goals[-1].value == 0.438


def test_the_report_says_whether_the_goals_were_written_before_its_results(tmp_path):
    first = [GoalConfig(name="RL beats MLE", compare="rl - mle")]
    assert goals.provenance(first, tmp_path).startswith("No record from before the results")
    goals.record(first, tmp_path)
    assert goals.provenance(first, tmp_path).startswith("Written down before the results")
    # changed before any report exists: still the goal written down first, recorded again
    second = [GoalConfig(name="RL beats MLE by 0.01", compare="rl - mle", test="diff_at_least", value=0.01)]
    goals.record(second, tmp_path)
    assert goals.provenance(second, tmp_path).startswith("Written down before the results")
    # once a report exists the record stays: an edit made with the results in view is said to be one
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "results.json").write_text("{}")
    goals.record(first, tmp_path)
    assert goals.provenance(first, tmp_path).startswith("**Changed after the results**")
    assert goals.provenance(second, tmp_path).startswith("Written down before the results")
    assert "the pipeline began on" in goals.markdown(goals.check(second, RESULTS), goals.provenance(second, tmp_path))


def test_a_pipe_in_a_goal_name_does_not_split_its_row():
    md = goals.markdown(goals.check([GoalConfig(name="RL | MLE", compare="rl - mle")], RESULTS))
    assert r"| RL \| MLE | rl - mle la_rougeL" in md


def test_the_run_plan_names_the_goal_lines():
    from lastmile.plan import make_plan

    cfg = load_config(ROOT / "trainer" / "configs" / "tiny.yaml")
    assert "the goal's 2 lines (report.goals)" in make_plan(cfg, "pipeline", 1).stages["report"]
