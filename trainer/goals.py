"""A goal fixed before the run, read off the report's results line by line: met or not, with its numbers.

Each line (`report.goals`, `GoalConfig`) is either a comparison a - b with its paired bootstrap 95% interval
(`above_zero`: low end above 0; `reaches_zero`: high end at least 0; `diff_at_least`: mean difference at
least `value`) or a system's mean (`at_least` / `at_most` `value`). A line whose numbers the results lack
(a system that was not evaluated, a reward the report could not score) is `not measured`, never met.

    goals.check(cfg.report.goals, results)   # results: report/results.json as a dict
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lastmile.config import GoalConfig


@dataclass(frozen=True)
class GoalLine:
    name: str
    rule: str  # what the line asks, e.g. "rl - mle la_rougeL: 95% interval above 0"
    met: bool | None  # None: the results lack the numbers
    numbers: str  # what was measured, e.g. "+0.0123 [+0.0040, +0.0210]"


def check(goals: list[GoalConfig], results: dict) -> list[GoalLine]:
    return [_line(g, results) for g in goals]


def _line(g: GoalConfig, results: dict) -> GoalLine:
    if g.compare is not None:
        rule = f"{g.compare} {g.metric}: " + {"above_zero": "95% interval above 0",
                                              "reaches_zero": "95% interval reaches 0 or above",
                                              "diff_at_least": f"mean difference at least {g.value:+g}"}[g.test]
        c = results.get("comparisons", {}).get(g.compare, {}).get(g.metric)
        if c is None:
            return GoalLine(g.name, rule, None, "not measured")
        lo, mean, hi = c["ci_low"], c["mean_diff"], c["ci_high"]
        met = {"above_zero": lo > 0, "reaches_zero": hi >= 0, "diff_at_least": mean >= g.value}[g.test]
        return GoalLine(g.name, rule, bool(met), f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    rule = f"{g.system} {g.metric}: {'at least' if g.test == 'at_least' else 'at most'} {g.value:g}"
    v = results.get("systems", {}).get(g.system, {}).get(g.metric)
    if v is None:
        return GoalLine(g.name, rule, None, "not measured")
    return GoalLine(g.name, rule, bool(v >= g.value if g.test == "at_least" else v <= g.value), f"{v:.4f}")


def markdown(lines: list[GoalLine]) -> str:
    if not lines:
        return ""
    mark = {True: "met", False: "not met", None: "not measured"}
    rows = ["## The goal, line by line", "",
            "Fixed in the config (`report.goals`) before the run; read off the results above.", "",
            "| goal | rule | measured | |", "|---|---|---|---|"]
    rows += [f"| {x.name} | {x.rule} | {x.numbers} | **{mark[x.met]}** |" for x in lines]
    return "\n".join(rows) + "\n"


def as_json(lines: list[GoalLine]) -> list[dict]:
    return [asdict(x) for x in lines]
