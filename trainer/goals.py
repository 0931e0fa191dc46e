"""A goal fixed before the run, read off the report's results line by line: met or not, with its numbers.

Each line (`report.goals`, `GoalConfig`) is either a comparison a - b with its paired bootstrap 95% interval
(`above_zero`: low end above 0; `reaches_zero`: high end at least 0; `diff_at_least`: mean difference at
least `value`) or a system's mean (`at_least` / `at_most` `value`). A line whose numbers the results lack
(semantic similarity with `eval.semantic_model=none` is refused when the config loads) is `not measured`.
The report also says whether the lines are the ones written down before its results: `record`, called
when the pipeline begins, keeps them in `<output_dir>/report_goals.json` while no report exists yet.

    goals.check(cfg.report.goals, results)   # results: report/results.json as a dict
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lastmile.checkpoint import write_json_atomic
from lastmile.config import GoalConfig

RECORD = "report_goals.json"  # in output_dir: the goals as they stood before the report existed


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


def record(goals: list[GoalConfig], output_dir: Path) -> None:
    """Rank 0, when the pipeline begins: while no report exists in `output_dir`, keep the goals as the config
    gives them (a change made before any result is still the goal written down first). Once a report
    exists the record is never rewritten, so a later edit shows in `provenance`."""
    if not goals or any(output_dir.glob("report*/results.json")):
        return
    path = output_dir / RECORD
    now = [asdict(g) for g in goals]
    if not path.is_file() or json.loads(path.read_text()).get("goals") != now:
        write_json_atomic(path, {"recorded_at": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"), "goals": now})


def provenance(goals: list[GoalConfig], output_dir: Path) -> str:
    """One sentence: are these the lines recorded before the report's results existed?"""
    path = output_dir / RECORD
    if not path.is_file():
        return ("No record from before the results exists: these are the lines as the config gives them now "
                f"(`report.goals`; `lastmile pipeline` records them in {RECORD} while no report exists).")
    rec = json.loads(path.read_text())
    if rec.get("goals") == [asdict(g) for g in goals]:
        return (f"Written down before the results: the config held these lines (`report.goals`) when the pipeline "
                f"began on {rec['recorded_at']}, before any report existed ({RECORD}).")
    return (f"**Changed after the results**: these lines differ from the ones recorded before any report existed "
            f"({rec['recorded_at']}, in {RECORD}); read them as chosen with the results in view.")


def markdown(lines: list[GoalLine], provenance_line: str = "") -> str:
    if not lines:
        return ""
    mark = {True: "met", False: "not met", None: "not measured"}
    rows = ["## The goal, line by line", "", provenance_line or "As the config gives them (`report.goals`).", "",
            "| goal | rule | measured | |", "|---|---|---|---|"]
    cell = [x.name.replace("|", r"\|") for x in lines]  # a | in a name would split its row
    rows += [f"| {name} | {x.rule} | {x.numbers} | **{mark[x.met]}** |" for name, x in zip(cell, lines)]
    return "\n".join(rows) + "\n"


def as_json(lines: list[GoalLine], provenance_line: str) -> dict:
    return {"provenance": provenance_line, "lines": [asdict(x) for x in lines]}
