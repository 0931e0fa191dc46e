"""The pipeline's final artifact: untuned, raw MLE, post-processed MLE, raw RL and post-processed RL (and
best-of-n fine-tuning, raw and post-processed, when best_of_n.in_pipeline is set)
on the same held-out examples (`data.eval_split`), every metric with paired bootstrap 95% intervals,
training curves, and examples side by side. Written to <output_dir>/report/ (report.md, results.json,
metrics.png, curves.png) and logged to the pipeline's parent run. With `report.goals` it also gives the
goal, line by line, met or not (also goals.json).

    lastmile pipeline --config trainer/configs/demo.yaml      # ends with this report
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

from lastmile import checkpoint, distributed, goals, tracking
from lastmile.config import REPORT_COMPARED, REPORT_COMPARISONS, REPORT_VALUES, Config, report_systems
from lastmile.metrics import paired_bootstrap
from lastmile.stages.evaluate import SystemSpec, evaluate_systems, write_results

EXAMPLES = 5
DRAWN = 10


def run(cfg: Config) -> dict:
    out = Path(cfg.output_dir)
    models = {"untuned": cfg.model.path, "mle": str(out / "sft" / "model"), "rl": str(out / "ppo" / "model"),
              "best-of-n": str(out / "best_of_n" / "model")}  # best-of-n: the cheap baseline RL has to beat
    specs = [SystemSpec(name, model=models[name]) for name in report_systems(cfg, post=False)]
    folder = out / "report"
    results = evaluate_systems(cfg, specs, list(REPORT_COMPARISONS), folder, run_name="evaluate:report")
    if not distributed.setup().is_main:
        return results
    folder = Path(results["folder"])  # report/, or report-<identity> when report/ holds another evaluation
    results = add_reward_scores(cfg, folder, results)
    curves = out / "ppo" / "curves.png"
    if curves.is_file():
        shutil.copyfile(curves, folder / "curves.png")
    lines, said = goals.check(cfg.report.goals, results), goals.provenance(cfg.report.goals, out)
    checkpoint.write_json_atomic(folder / "goals.json", goals.as_json(lines, said))
    (folder / "report.md").write_text(markdown(results, _ppo_summary(out), lines, said) + _examples(folder),
                                      encoding="utf-8")
    _log_to_parent(cfg, folder)
    print(f"Report: {folder / 'report.md'}", flush=True)
    return results


def add_reward_scores(cfg: Config, folder: Path, results: dict) -> dict:
    """Every system's summaries scored by the pipeline's reward model (prompt + summary, the form it was
    trained on), normalized with its reward_stats.json: `reward` per system, per example, and in every
    comparison's paired bootstrap. Rank 0, after the evaluation; kept in results.json (a rerun reuses it)."""
    rm_path = Path(cfg.ppo.reward.model or Path(cfg.output_dir) / "reward_model" / "model")
    if not (rm_path / "config.json").is_file() or all("reward" in v for v in results["systems"].values()):
        return results
    from lastmile.data.predictions import read_predictions
    from lastmile.data.prompts import PromptBuilder
    from lastmile.data.records import load_split
    from lastmile.models import TREE_MASK_ATTENTION, ScalarRewardModel, load_reward_backbone, load_tokenizer
    from lastmile.rollout import RolloutModels, fixed_rollout, reward_model_scores
    from lastmile.stages.ppo_setup import reward_stats
    from lastmile.stages.reward_model import prompt_ids_by_id, summary_ids

    device = distributed.setup().device
    tokenizer = load_tokenizer(replace(cfg.model, path=str(rm_path), gguf_file=None, tokenizer_path=None))
    builder = PromptBuilder(tokenizer, cfg.prompt)
    examples = load_split(cfg.data, cfg.data.eval_split, cfg.eval.max_examples or cfg.data.max_eval_examples)
    prompts = prompt_ids_by_id(examples, builder)
    backbone, attn = load_reward_backbone(cfg.model, str(rm_path), device, tokenizer.pad_token_id, seed=cfg.seed)
    model = ScalarRewardModel(backbone).to(device).eval()
    stats = reward_stats(str(rm_path))
    names = list(results["systems"])
    texts = {name: read_predictions(folder / f"predictions-{name}.jsonl", examples) for name in names}
    # paper by paper, its systems' summaries in consecutive rows: packed (data/prefix_pack.py), each
    # document is read once for all of them instead of once per system
    rows = [(i, name) for i in range(len(examples)) for name in names]
    rollout = fixed_rollout([i for i, _ in rows], [prompts[examples[i].id] for i, _ in rows],
                            [summary_ids(builder, texts[name][i]) for i, name in rows], tokenizer.pad_token_id)
    packed = attn.implementation in TREE_MASK_ATTENTION
    batch = cfg.eval.generation.batch_size
    models = RolloutModels(actor=None, actor_engine=None, ref=None, rm=model, critic=None, tokenizer=tokenizer,
                           rm_stats=stats, device=device, precision=cfg.precision, shared_prefix=packed,
                           micro_batch=len(names) * max(1, batch // len(names)) if packed else batch)
    raw = reward_model_scores(model, rollout, models).view(len(examples), len(names))
    for j, name in enumerate(names):
        scores = [(r - stats["mean"]) / stats["std"] for r in raw[:, j].tolist()]
        results["per_example"][name]["reward"] = scores
        results["systems"][name]["reward"] = sum(scores) / len(scores)
    for comp, by_metric in results["comparisons"].items():
        a, b = comp.split(" - ")
        by_metric["reward"] = paired_bootstrap(results["per_example"][b]["reward"], results["per_example"][a]["reward"],
                                               samples=cfg.eval.bootstrap_samples, seed=cfg.seed)
    write_results(folder, results, Path(cfg.output_dir))
    return results


def _ppo_summary(out: Path) -> dict:
    path = out / "ppo" / "history.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def markdown(results: dict, ppo: dict, goal_lines: list[goals.GoalLine] = (), goals_provenance: str = "") -> str:
    systems = results["systems"]
    lines = [f"# MLE vs RL on {results['n_examples']} held-out examples "
             f"({results['data']['source']}:{results['data']['split']})", "",
             "| system | " + " | ".join(_label(k) for k in REPORT_VALUES if k in next(iter(systems.values()))) + " |",
             "|---|" + "---|" * sum(k in next(iter(systems.values())) for k in REPORT_VALUES)]
    for name, v in systems.items():
        lines.append(f"| {name} | " + " | ".join(f"{v[k]:.2f}" if k.startswith("len/") or k.endswith("_share") else f"{v[k]:.4f}"
                                                 for k in REPORT_VALUES if k in v) + " |")
    metrics = [m for m in REPORT_COMPARED if any(m in c for c in results["comparisons"].values())]
    lines += ["", "Paired bootstrap over examples: difference a - b and its 95% interval (an interval that excludes 0 "
              "is a difference the sample supports).", "",
              "| a - b | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for comp, by_metric in results["comparisons"].items():
        cells = [f"{by_metric[m]['mean_diff']:+.4f} [{by_metric[m]['ci_low']:+.4f}, {by_metric[m]['ci_high']:+.4f}]"
                 if m in by_metric else "" for m in metrics]
        lines.append(f"| {comp} | " + " | ".join(cells) + " |")
    if ppo:
        best = ppo.get("best") or {}
        lines += ["", f"PPO: {ppo.get('iterations')} iterations; published model: best dev "
                  f"{best.get('metric')} {best.get('value', float('nan')):.4f} at iteration {best.get('iteration')}.",
                  f"Alarms: {len(ppo.get('alarms', []))}" + "".join(f"\n- {a}" for a in ppo.get("alarms", [])[:10]),
                  "", "![training curves](curves.png)"]
    if goal_lines:
        lines += ["", goals.markdown(list(goal_lines), goals_provenance)]
    lines += ["", "![metrics](metrics.png)", ""]
    return "\n".join(lines) + "\n"


def _label(key: str) -> str:
    return {"len/pred_words_mean": "words", "len/ratio_mean": "length ratio", "repetition_share": "with repetition",
            "unfinished_share": "unfinished"}.get(key, key)


def _examples(folder: Path) -> str:
    """Side-by-side examples by two fixed rules, neither a choice by hand: the DRAWN examples with the
    smallest sha256("example:" + id) (a fixed random draw), and the EXAMPLES where raw RL and raw MLE
    differ most in ROUGE-L (either way)."""
    rows = [json.loads(x) for x in (folder / "samples.jsonl").read_text(encoding="utf-8").split("\n") if x.strip()]
    if not rows or "rl" not in rows[0] or "mle" not in rows[0]:
        return ""
    drawn = sorted(rows, key=lambda r: drawn_key(r["id"]))[:DRAWN]
    changed = [r for r in rows if r["rl"] != r["mle"]]  # identical summaries are no example of a difference
    differ = sorted(changed, key=lambda r: -abs(r["rougeL"]["rl"] - r["rougeL"]["mle"]))[:EXAMPLES]
    drawn_part = _example_section(f"{len(drawn)} examples drawn by a fixed rule "
                                  "(smallest sha256(\"example:\" + id))", drawn)
    if not differ:
        return drawn_part + (f"## RL and MLE differ nowhere\n\nRL's summary is the same as MLE's on all {len(rows)} "
                             "examples (as when PPO publishes its iteration 0, the MLE model itself).\n")
    title = (f"The {len(differ)} examples where RL and MLE differ most" if len(differ) > 1
             else "The one example where RL and MLE differ")
    return drawn_part + _example_section(f"{title} in ROUGE-L", differ)


def drawn_key(example_id: str) -> str:
    return hashlib.sha256(f"example:{example_id}".encode("utf-8")).hexdigest()


def _example_section(title: str, rows: list[dict]) -> str:
    parts = [f"## {title}", ""]
    for r in rows:
        parts += [f"### {r['id']}", "", f"- **reference**: {r['reference']}"]
        parts += [f"- **{n}** (ROUGE-L {r['rougeL'][n]:.3f}): {r[n]}" for n in ("untuned", "mle", "mle+post", "rl", "rl+post")
                  if n in r]
        parts.append("")
    return "\n".join(parts) + "\n"


def _log_to_parent(cfg: Config, folder: Path) -> None:
    if not (cfg.tracking.enabled and cfg.tracking.parent_run_id):
        return
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    for name in ("report.md", "results.json", "goals.json", "metrics.png", "curves.png", "samples.md"):
        if (folder / name).is_file():
            client.log_artifact(cfg.tracking.parent_run_id, str(folder / name), artifact_path="report")
    results = json.loads((folder / "results.json").read_text())
    logged = client.get_run(cfg.tracking.parent_run_id).data.metrics  # a rerun after a kill logs nothing twice
    for name, v in results["systems"].items():
        for k in ("rougeL", "la_rougeL", "semantic", "reward"):
            key = f"report/{name.replace('+', '_')}/{k}"
            if k in v and key not in logged:
                client.log_metric(cfg.tracking.parent_run_id, key, v[k])
