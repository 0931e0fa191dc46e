"""Compare evaluated systems across runs: `lastmile compare SOURCE SOURCE [...]`.

    lastmile compare runs/demo/eval/sft runs/demo/eval/rl
    lastmile compare 3f2a...c1 9be0...77 tracking.uri=http://mlflow.internal:5000   # MLflow run ids
    lastmile compare pipeline:4c1d2e3f4a5b output_dir=runs/x     # every evaluation of one pipeline

A SOURCE is an evaluation folder (results.json + samples.jsonl, as `lastmile evaluate` writes), the
id of an MLflow evaluate run (its artifacts are read from the store `tracking.uri` names), or
`pipeline:<id>` (every evaluate run tagged with that pipeline id). Each source holds one or more
systems (e.g. `model`, `model+post`); they are compared on the examples all sources share: every
metric per system, paired bootstrap 95% intervals of each system minus the first source's first
system, length and failure statistics (repetition, unfinished last sentence), the examples where the
first system and the first other one (not its `+post` copy) wrote different summaries and differ
most in ROUGE-L, and a metrics plot. Writes <output_dir>/compare/<hash>/report.md and
report.html and logs them to an MLflow run of its own (stage `compare`), tagged with what it compared.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lastmile import checkpoint, metrics, tracking
from lastmile.config import COMPARED, Config
from lastmile.errors import UserError
from lastmile.plots import plot_grid, plot_metric_bars
from lastmile.stages.evaluate import mlflow_name, read_results

REPORTED = ("rouge1", "rouge2", "rougeL", "la_rougeL", "semantic")


@dataclass(frozen=True)
class Evaluation:
    label: str  # short name of the source
    source: str  # folder or run id
    run_id: str | None
    ids: tuple[str, ...]
    predictions: dict[str, tuple[str, ...]]  # system -> prediction per id
    references: tuple[str, ...]
    scores: dict[str, dict[str, list[float]]]  # system -> metric -> per example
    output_dir: str | None = None  # an MLflow source's output_dir (its tag): what its results' paths are relative to


def run(cfg: Config, sources: list[str]) -> dict:
    if len(sources) < 1:
        raise UserError("lastmile compare needs at least one SOURCE (two systems in all): evaluation folders, MLflow "
                        "run ids, or pipeline:<id>.")
    evaluations = unique_labels([e for s in sources for e in load_source(cfg, s)])
    systems = [(e, name) for e in evaluations for name in e.predictions]
    if len(systems) < 2:
        raise UserError(f"{', '.join(sources)} hold{'s' if len(sources) == 1 else ''} only one system. Give two or "
                        "more evaluations to compare.")
    shared = shared_ids(evaluations)
    if not shared:
        raise UserError(f"{', '.join(sources)} share no evaluation example ids. Compare evaluations of the same data.")
    result = compare(evaluations, shared, cfg)
    folder = Path(cfg.output_dir) / "compare" / hashlib.sha256("\n".join(sources).encode()).hexdigest()[:10]
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json_atomic(folder / "results.json", result)
    md = markdown(result) + (CURVES_SECTION if training_curves(evaluations) else "")
    (folder / "report.md").write_text(md, encoding="utf-8")
    (folder / "report.html").write_text(to_html(md), encoding="utf-8")
    plot_metric_bars(folder / "metrics.png", {k: {m: v[m] for m in ("rougeL", "la_rougeL", "semantic") if m in v}
                                               for k, v in result["systems"].items()}, title="Compared systems")
    curves = training_curves(evaluations)
    if curves:
        plot_grid(folder / "curves.png", curves, title="RL training of the compared systems (in-loop: dev split)")
    tracker = tracking.start(cfg, stage="compare", is_main=True, run_name="compare:" + " vs ".join(
        e.label for e in evaluations))
    with tracking.closing(tracker):
        tracker.set_tags({"lastmile.compared_runs": ",".join(e.run_id for e in evaluations if e.run_id),
                          "lastmile.compared_sources": ",".join(sources)[:5000]})
        flat = {f"compare/{mlflow_name(k)}/{m}": v for k, vals in result["systems"].items() for m, v in vals.items()}
        tracker.log_metrics(flat)
        for name in ("report.md", "report.html", "results.json", "metrics.png", "curves.png"):
            if (folder / name).is_file():
                tracker.log_artifact(folder / name)
    print(f"Compared {len(systems)} systems on {len(shared)} shared examples: {folder / 'report.md'}", flush=True)
    return result


CURVES_SECTION = ("\n## Training curves\n\nIn-loop evaluations and rollouts of every compared system that a PPO "
                  "stage produced (its history.json).\n\n![training curves](curves.png)\n")
CURVE_PANELS = (  # panel title, history list, key
    ("dev la-ROUGE-L (greedy)", "evals", "eval/policy/la_rougeL"),
    ("dev ROUGE-L (greedy)", "evals", "eval/policy/rougeL"),
    ("dev reward-model score (its own RM)", "evals", "eval/policy/reward"),
    ("dev KL to reference (nats/seq)", "evals", "eval/policy/kl"),
    ("rollout reward (its own definition)", "history", "reward/score_mean"),
    ("rollout response tokens", "history", "rollout/response_tokens_mean"),
)


def training_curves(evaluations: list[Evaluation]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Panel -> system -> (iteration, value) for every compared folder's system made by a PPO stage (the
    model folder's stage holds history.json). Empty when none was."""
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {title: {} for title, _, _ in CURVE_PANELS}
    seen: set[Path] = set()
    for e in evaluations:
        res = Path(e.source) / "results.json"
        if not res.is_file():
            continue
        for name, system in read_results(Path(e.source), output_dir=e.output_dir).get("systems", {}).items():
            hist = Path(str(system.get("source", ""))).parent / "history.json"
            if name.endswith("+post") or hist in seen or not hist.is_file():
                continue
            seen.add(hist)
            summary = json.loads(hist.read_text())
            label = e.label if len(e.predictions) <= 2 else f"{e.label}:{name}"
            for title, rows, key in CURVE_PANELS:
                points = [(r["iteration"], r[key]) for r in summary.get(rows, []) if key in r]
                if points:
                    panels[title][label] = points
    return {t: c for t, c in panels.items() if c}


def unique_labels(evaluations: list[Evaluation]) -> list[Evaluation]:
    """Sources with the same label (e.g. two `.../eval/rl` folders) get the shortest path tail that tells
    them apart (`abl_a/eval/rl`), else a number; their systems would otherwise overwrite each other."""
    labels = [e.label for e in evaluations]
    for depth in range(2, 6):
        dup = {x for x in labels if labels.count(x) > 1}
        if not dup:
            break
        labels = ["/".join(Path(e.source).parts[-depth:]) if x in dup and Path(e.source).is_dir() else x
                  for e, x in zip(evaluations, labels)]
    dup, seen = {x for x in labels if labels.count(x) > 1}, {}
    for i, x in enumerate(labels):
        if x in dup:
            seen[x] = seen.get(x, 0) + 1
            labels[i] = f"{x}#{seen[x]}"
    return [replace(e, label=x) for e, x in zip(evaluations, labels)]


def shared_ids(evaluations: list[Evaluation]) -> list[str]:
    """The example ids every source holds, in the first source's order: resampled in that order, two
    systems of one evaluation get the very intervals `lastmile evaluate` reported for them."""
    common = set.intersection(*(set(e.ids) for e in evaluations))
    return [i for i in evaluations[0].ids if i in common]


def load_source(cfg: Config, source: str) -> list[Evaluation]:
    path = Path(source)
    if path.is_dir():
        return [_from_folder(path, label=path.name, run_id=None)]
    if source.startswith("pipeline:"):
        runs = _search(cfg, f"tags.`lastmile.pipeline_id` = '{source[9:]}' and tags.`lastmile.stage` = 'evaluate'")
        if not runs:
            raise UserError(f"{source}: no evaluate runs with that pipeline id in {tracking.tracking_uri(cfg)}.")
        return [_from_run(cfg, r.info.run_id, r.info.run_name or r.info.run_id[:8]) for r in runs]
    if re.fullmatch(r"[0-9a-f]{32}", source):
        return [_from_run(cfg, source, None)]
    raise UserError(f"SOURCE ({source}) is neither an evaluation folder, a 32-hex MLflow run id, nor pipeline:<id>. "
                    "Point it at e.g. runs/demo/eval/sft.")


def _search(cfg: Config, query: str):
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    return mlflow.search_runs(search_all_experiments=True, filter_string=query, output_format="list")


def _from_run(cfg: Config, run_id: str, label: str | None) -> Evaluation:
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    try:
        run = mlflow.get_run(run_id)
        folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="results.json")).parent
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="samples.jsonl", dst_path=str(folder))
    except (MlflowException, OSError) as e:
        raise UserError(f"MLflow run {run_id} at {tracking.tracking_uri(cfg)} has no evaluation artifacts "
                        f"(results.json, samples.jsonl): {str(e)[:200]}. Give the id of an evaluate run.") from None
    return replace(_from_folder(folder, label=label or run.info.run_name or run_id[:8], run_id=run_id),
                   output_dir=run.data.tags.get("lastmile.output_dir"))


def _from_folder(folder: Path, *, label: str, run_id: str | None) -> Evaluation:
    res_file, samples = folder / "results.json", folder / "samples.jsonl"
    if not res_file.is_file() or not samples.is_file():
        raise UserError(f"{folder} holds no evaluation (results.json and samples.jsonl). Run `lastmile evaluate` or "
                        "point at a folder it wrote, e.g. runs/demo/eval/sft.")
    results = _read_results(folder, res_file)
    names = list(results["systems"])
    rows = _sample_rows(folder, samples, names)
    _check_scores(folder, results, names, len(rows))
    if run_id is None:
        run_id = _run_id_of(folder)
    return Evaluation(label, str(folder), run_id, tuple(r["id"] for r in rows),
                      {n: tuple(r[n] for r in rows) for n in names}, tuple(r["reference"] for r in rows),
                      {n: results["per_example"][n] for n in names})


def _damaged(folder: Path, problem: str) -> UserError:
    return UserError(f"SOURCE ({folder}) is a damaged evaluation: {problem}. Its summaries and scores cannot be "
                     f"matched, so a comparison would report wrong numbers. Delete {folder} and run `lastmile "
                     "evaluate` again with the settings that made it, or compare another folder.")


def _read_results(folder: Path, path: Path) -> dict:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _damaged(folder, f"results.json is not valid JSON ({e})") from None
    if not (isinstance(results, dict) and isinstance(results.get("systems"), dict)
            and isinstance(results.get("per_example"), dict)):
        raise _damaged(folder, 'results.json has no "systems" and "per_example" as `lastmile evaluate` writes them')
    return results


def _sample_rows(folder: Path, path: Path, names: list[str]) -> list[dict]:
    """samples.jsonl: one object per example with its id, reference and every system's summary."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _damaged(folder, f"samples.jsonl line {n} is not valid JSON ({e.msg})") from None
        missing = [k for k in ("id", "reference", *names) if not isinstance(row, dict) or k not in row]
        if missing:
            raise _damaged(folder, f"samples.jsonl line {n} has no {', '.join(map(repr, missing))} (results.json lists "
                                   f"the systems {', '.join(names)})")
        rows.append(row)
    return rows


def _check_scores(folder: Path, results: dict, names: list[str], n_rows: int) -> None:
    """Every system has per-example scores, one per sample."""
    for name in names:
        scores = results["per_example"].get(name)
        if not isinstance(scores, dict):
            raise _damaged(folder, f"results.json has no per-example scores of system {name!r}")
        for metric, values in scores.items():
            if not isinstance(values, list) or len(values) != n_rows:
                count = len(values) if isinstance(values, list) else "no list of"
                raise _damaged(folder, f"results.json has {count} per-example {metric} scores of system {name!r} "
                                       f"for {n_rows} samples")


def _run_id_of(folder: Path) -> str | None:
    done = folder / "run.json"
    return json.loads(done.read_text()).get("run_id") if done.is_file() else None


def compare(evaluations: list[Evaluation], shared: list[str], cfg: Config) -> dict:
    """Means, statistics and paired bootstrap intervals (each system minus the first) on `shared` ids."""
    systems, per = {}, {}
    for e in evaluations:
        index = {i: k for k, i in enumerate(e.ids)}
        rows = [index[i] for i in shared]
        for name, preds in e.predictions.items():
            key = f"{e.label}:{name}"
            texts = [preds[k] for k in rows]
            scores = {m: [v[k] for k in rows] for m, v in e.scores[name].items() if m in REPORTED}
            per[key] = {"texts": texts, "scores": scores}
            systems[key] = {m: float(np.mean(v)) for m, v in scores.items()}
            systems[key].update(metrics.failure_stats(texts))
            systems[key]["words_mean"] = float(np.mean([metrics.n_words(t) for t in texts]))
    base = next(iter(per))
    deltas = {f"{k} - {base}": {m: metrics.paired_bootstrap(per[base]["scores"][m], per[k]["scores"][m],
                                                             samples=cfg.eval.bootstrap_samples, seed=cfg.seed)
                                for m in COMPARED if m in per[k]["scores"] and m in per[base]["scores"]}
              for k in per if k != base}
    a = next(iter(per))  # the first system, against the first one that is not its post-processed copy
    b = next((k for k in per if k.removesuffix("+post") != a.removesuffix("+post")), next(k for k in per if k != a))
    changed = [i for i in range(len(shared)) if per[a]["texts"][i] != per[b]["texts"][i]]
    diff = sorted(changed, key=lambda i: -abs(per[a]["scores"]["rougeL"][i] - per[b]["scores"]["rougeL"][i]))
    first = evaluations[0]
    ref_of = dict(zip(first.ids, first.references))
    examples = [{"id": shared[i], "reference": ref_of[shared[i]], a: per[a]["texts"][i], b: per[b]["texts"][i],
                 "rougeL": {a: per[a]["scores"]["rougeL"][i], b: per[b]["scores"]["rougeL"][i]}} for i in diff[:5]]
    return {"n_shared": len(shared), "sources": [e.source for e in evaluations], "systems": systems,
            "comparisons": deltas, "examples": examples, "pair": [a, b]}


def markdown(r: dict) -> str:
    cols = [c for c in REPORTED + ("words_mean", "repetition_share", "unfinished_share")
            if all(c in v for v in r["systems"].values())]
    out = [f"# Comparison on {r['n_shared']} shared examples", "", "Sources: " + ", ".join(r["sources"]), "",
           "| system | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    out += [f"| {k} | " + " | ".join(f"{v[c]:.4f}" for c in cols) + " |" for k, v in r["systems"].items()]
    ms = sorted({m for d in r["comparisons"].values() for m in d}, key=COMPARED.index)
    out += ["", "Paired bootstrap over the shared examples: difference and 95% interval (excluding 0: a real "
            "difference).", "", "| a - b | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms)]
    for comp, d in r["comparisons"].items():
        out.append(f"| {comp} | " + " | ".join(f"{d[m]['mean_diff']:+.4f} [{d[m]['ci_low']:+.4f}, {d[m]['ci_high']:+.4f}]"
                                               if m in d else "" for m in ms) + " |")
    a, b = r["pair"]
    out += ["", "![metrics](metrics.png)", "", f"## Where {a} and {b} differ most (ROUGE-L)", ""]
    if not r["examples"]:
        out += [f"{a} and {b} give the same summary on all {r['n_shared']} shared examples.", ""]
    for ex in r["examples"]:
        out += [f"### {ex['id']}", "", f"- **reference**: {ex['reference']}",
                f"- **{a}** ({ex['rougeL'][a]:.3f}): {ex[a]}", f"- **{b}** ({ex['rougeL'][b]:.3f}): {ex[b]}", ""]
    return "\n".join(out) + "\n"


def to_html(md: str) -> str:
    """The report as a standalone page: tables, headings, list items and the plot (no extra dependency)."""
    body, rows = [], []
    for line in md.split("\n"):
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                rows.append(cells)
            continue
        if rows:
            head, *rest = rows
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>" +
                        "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest) +
                        "</table>")
            rows = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            body.append(f'<img src="{html.escape(line[line.index("(") + 1 : -1])}">')
        elif line.startswith("- "):
            body.append(f"<p>&bull; {html.escape(line[2:]).replace('**', '')}</p>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{border:1px solid #ccc;padding:3px 6px}" \
            "table{border-collapse:collapse;margin:8px 0}"
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>" + "\n".join(body) + \
        "</body></html>\n"
