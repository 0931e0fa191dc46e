"""The budget curve: PPO's greedy dev metrics against episodes and hours, for one or more PPO runs.

    python bench/budget_curve.py runs/scitldr_v2/ppo:"ReMax, T = 0.7" runs/scitldr_v2-t1/ppo:"ReMax, T = 1" \
        --plot docs/img/scitldr-v2-budget.png

A RUN is a PPO stage folder (`<output_dir>/ppo`), optionally `:label`. Its in-loop evaluations come from
history.json (a finished run) or, for a run still going, from the trainer state of its newest
checkpoint. Episodes = iteration x ppo.prompts_per_iteration x ppo.samples_per_prompt (from the run's
config.yaml); hours = the sum of the iterations' own wall time (`time/iteration_s`: rollout and
update, not the in-loop evaluations or checkpoint writes). Prints one markdown table per run and,
with --plot, draws la-ROUGE-L and semantic similarity (when evaluated) against episodes.

Wall time counts whatever held the process up: an iteration that took over 10x the run's median (a
paused or starved process, not PPO's work) is named under the table with the hours it adds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from lastmile.checkpoint import STATE_FILE
from lastmile.plots import plot_grid


@dataclass(frozen=True)
class Point:
    iteration: int
    episodes: int
    hours: float
    la_rougeL: float
    rougeL: float
    semantic: float | None
    length_ratio: float


def read_run(stage_dir: Path) -> tuple[list[dict], list[dict]]:
    """(evals, per-iteration history) of a PPO stage folder, finished or still running."""
    summary = stage_dir / "history.json"
    if summary.is_file():
        h = json.loads(summary.read_text())
        return h["evals"], h["history"]
    steps = sorted((stage_dir / "checkpoints").glob("step-*/" + STATE_FILE))
    if not steps:
        raise SystemExit(f"{stage_dir}: neither history.json nor a checkpoint with {STATE_FILE}; "
                         "pass a PPO stage folder (<output_dir>/ppo) that has run at least one save")
    state = json.loads(steps[-1].read_text())
    return state.get("evals", []), state.get("history", [])


@dataclass(frozen=True)
class SlowIterations:
    median_s: float
    seconds: dict[int, float]  # iteration -> wall seconds, for those over `factor` x the median

    def line(self, label: str) -> str:
        named = ", ".join(f"{it} ({t:.0f} s)" for it, t in self.seconds.items())
        held = sum(self.seconds.values()) / 3600
        beyond = sum(t - self.median_s for t in self.seconds.values()) / 3600
        return (f"{label}: iterations over 10x the median wall time ({self.median_s:.1f} s): {named}; "
                f"they hold {held:.2f} h of the hours column, {beyond:.2f} h beyond the median")


def slow_iterations(history: list[dict], factor: float = 10.0) -> SlowIterations:
    """The iterations whose wall time is over `factor` x the run's median (a paused or starved process)."""
    times = {int(h["iteration"]): float(h.get("time/iteration_s", 0.0)) for h in history}
    median = statistics.median(times.values()) if times else 0.0
    return SlowIterations(median, {it: t for it, t in sorted(times.items()) if t > factor * median})


def curve(stage_dir: Path) -> list[Point]:
    cfg = yaml.safe_load((stage_dir / "config.yaml").read_text())
    per_iteration = int(cfg["ppo"]["prompts_per_iteration"]) * int(cfg["ppo"]["samples_per_prompt"])
    evals, history = read_run(stage_dir)
    elapsed, hours_at = 0.0, {0: 0.0}  # iteration -> PPO hours when it ended
    for h in sorted(history, key=lambda h: int(h["iteration"])):
        elapsed += float(h.get("time/iteration_s", 0.0))
        hours_at[int(h["iteration"])] = elapsed / 3600
    points = []
    for e in evals:
        it = int(e["iteration"])
        points.append(Point(iteration=it, episodes=it * per_iteration, hours=hours_at[it],
                            la_rougeL=e["eval/policy/la_rougeL"], rougeL=e["eval/policy/rougeL"],
                            semantic=e.get("eval/policy/semantic"), length_ratio=e["eval/policy/length_ratio"]))
    return points


def table(label: str, points: list[Point]) -> str:
    lines = [f"| {label}: episodes | iteration | hours | la-ROUGE-L | ROUGE-L | semantic | length ratio |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        sem = f"{p.semantic:.4f}" if p.semantic is not None else "-"
        lines.append(f"| {p.episodes:,} | {p.iteration} | {p.hours:.2f} | {p.la_rougeL:.4f} | {p.rougeL:.4f} | "
                     f"{sem} | {p.length_ratio:.2f} |")
    return "\n".join(lines)


def plot(path: Path, curves: dict[str, list[Point]]) -> None:
    panels = {"dev la-ROUGE-L (greedy)": {label: [(p.episodes, p.la_rougeL) for p in pts] for label, pts in curves.items()}}
    if any(p.semantic is not None for pts in curves.values() for p in pts):
        panels["dev semantic similarity (greedy)"] = {
            label: [(p.episodes, p.semantic) for p in pts if p.semantic is not None] for label, pts in curves.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_grid(path, panels, title="The budget curve", xlabel="episodes")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="PPO stage folder, optionally followed by :label")
    ap.add_argument("--plot", type=Path, help="write the figure here (PNG)")
    args = ap.parse_args(argv)
    curves, slow = {}, {}
    for spec in args.runs:
        folder, _, label = spec.partition(":")
        stage_dir = Path(folder)
        if not (stage_dir / "config.yaml").is_file():
            raise SystemExit(f"{stage_dir}: no config.yaml; pass a PPO stage folder such as runs/demo/ppo")
        curves[label or folder] = curve(stage_dir)
        slow[label or folder] = slow_iterations(read_run(stage_dir)[1])
    for label, pts in curves.items():
        print(table(label, pts))
        if slow[label].seconds:
            print("\n" + slow[label].line(label))
        print()
    if args.plot:
        plot(args.plot, curves)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
