"""report.goals: checked when the config loads, read off the report's results line by line (hand values)."""

import pytest

from lastmile import goals
from lastmile.config import GoalConfig, load_config
from lastmile.errors import ConfigError

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
    assert "report.goals[2].metric (bleu) is not compared by the report" in msg
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


def test_goals_are_not_part_of_any_stage_identity():
    from lastmile.stages.common import SECTIONS, SHARED

    assert "report" not in SHARED and all("report" not in s for s in SECTIONS.values())
