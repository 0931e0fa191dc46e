"""Evaluate stage: generate summaries on held-out data and score them, raw and post-processed.

    lastmile evaluate --config trainer/configs/tiny.yaml output_dir=runs/tiny
    lastmile evaluate --config X eval.model=path/to/model data.source=my_data/ data.eval_split=test
    lastmile evaluate --config X eval.predictions=preds.jsonl       # score your own system's output

Systems: the evaluated model (default: <output_dir>/sft/model) and optionally a baseline
(`eval.baseline_model`, e.g. the untuned model), each raw and post-processed. Every other system is
compared with the primary raw one by paired bootstrap. Writes <output_dir>/eval/: results.json,
samples.jsonl, samples.md, predictions-<system>.jsonl, and logs them to one MLflow run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from trainer import checkpoint, distributed, metrics, tracking
from trainer.config import Config, to_yaml
from trainer.data.prompts import PromptBuilder
from trainer.data.records import Example, load_split
from trainer.distributed import DistInfo
from trainer.errors import DataError, UserError
from trainer.generation import generate
from trainer.models import load_causal_lm, load_tokenizer
from trainer.stages import common

log = logging.getLogger(__name__)

HEADLINE = ("rouge1", "rouge2", "rougeL", "rougeLsum", "la_rouge1", "la_rouge2", "la_rougeL", "semantic")
COMPARED = ("rougeL", "la_rougeL", "semantic")  # paired bootstrap: a - b with a 95% CI; p = P(a <= b)


@dataclass(frozen=True)
class System:
    name: str  # "model", "model+post", "baseline", ...
    source: str  # model path or predictions file
    predictions: tuple[str, ...]


def run(cfg: Config) -> dict:
    # Evaluation is short: a stop signal (handled by common.begin) lets it finish instead of killing it.
    dist, stage_dir, done = common.begin(cfg, "eval", "Evaluation")
    if done:
        return json.loads((stage_dir / "results.json").read_text())
    examples = load_split(cfg.data, cfg.data.eval_split, cfg.eval.max_examples or cfg.data.max_eval_examples)
    primary_model = None if cfg.eval.predictions else (cfg.eval.model or _default_model(cfg))
    upstream = tracking.upstream_run_id(cfg.output_dir, "sft")
    tracker = tracking.start(cfg, stage="evaluate", is_main=dist.is_main, upstream_run_id=upstream)
    with tracking.closing(tracker):
        systems = _collect_systems(cfg, primary_model, examples, dist)
        if not dist.is_main:
            return {}
        results = score_systems(systems, examples, cfg)
        _write(stage_dir, cfg, systems, examples, results, tracker)
    return results


def _collect_systems(cfg: Config, primary_model: str | None, examples: list[Example], dist: DistInfo) -> list[System]:
    primary = _system("model", cfg.eval.predictions, primary_model, cfg, examples, dist)
    systems = [primary, _postprocessed(primary)]
    if cfg.eval.baseline_model or cfg.eval.baseline_predictions:
        base = _system("baseline", cfg.eval.baseline_predictions, cfg.eval.baseline_model, cfg, examples, dist)
        systems += [base, _postprocessed(base)]
    return systems


def _default_model(cfg: Config) -> str:
    path = Path(cfg.output_dir) / "sft" / "model"
    if not (path / "config.json").is_file():
        raise UserError(
            f"eval.model is unset and {path} holds no model. Run `lastmile sft` with the same output_dir first, "
            "or set eval.model=<model path> or eval.predictions=<file.jsonl>."
        )
    return str(path)


def _postprocessed(system: System) -> System:
    return System(f"{system.name}+post", system.source, tuple(metrics.postprocess(p) for p in system.predictions))


def _system(name: str, predictions_file: str | None, model: str | None, cfg: Config, examples: list[Example],
            dist: DistInfo) -> System:
    if predictions_file:
        return System(name, predictions_file, tuple(read_predictions(Path(predictions_file), examples)))
    assert model is not None
    return System(name, model, tuple(_generate_all(model, cfg, examples, dist)))


def read_predictions(path: Path, examples: list[Example]) -> list[str]:
    """Predictions in example order from a JSONL of {"id", "prediction"}; every id must be present."""
    by_id: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            by_id[str(row["id"])] = str(row["prediction"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path} line {n}: expected a JSON object with \"id\" and \"prediction\".") from None
    missing = [ex.id for ex in examples if ex.id not in by_id]
    if missing:
        raise DataError(
            f"{path} has no prediction for {len(missing)} of {len(examples)} evaluation examples "
            f"(first: {', '.join(missing[:5])}). Predict every id of data.eval_split, or limit eval.max_examples."
        )
    return [by_id[ex.id] for ex in examples]


def _generate_all(model_path: str, cfg: Config, examples: list[Example], dist: DistInfo) -> list[str]:
    """Data-parallel generation: each rank holds the whole model and generates its shard."""
    tok_cfg = replace(cfg.model, path=model_path, tokenizer_path=None, gguf_file=None)
    tokenizer = load_tokenizer(tok_cfg)
    lm, attn = load_causal_lm(cfg.model, dist.device, path=model_path)
    lm.to(dist.device)
    if dist.is_main:
        log.info("evaluating %s (attention: %s)", model_path, attn.implementation)
    prompts, report = PromptBuilder(tokenizer, cfg.prompt).tokenize(examples, with_response=False)
    if dist.is_main:
        log.info("eval data: %s", report.describe())
    shard = list(range(dist.rank, len(prompts), dist.world_size))
    texts = generate(lm, tokenizer, [prompts[i] for i in shard], cfg.eval.generation, dist.device,
                     autocast_ctx=distributed.autocast(cfg.precision, dist.device), show_progress=dist.is_main,
                     desc=f"generate ({Path(model_path).name})")
    out: list[str] = [""] * len(prompts)
    for idx, txts in zip(distributed.gather_objects(shard), distributed.gather_objects(texts)):
        for i, t in zip(idx, txts):
            out[i] = t
    return out


def score_systems(systems: list[System], examples: list[Example], cfg: Config) -> dict:
    """Per-example scores, means, length stats, and paired bootstrap comparisons (comparison_pairs)."""
    refs = [list(ex.references) for ex in examples]
    semantic = None
    if cfg.eval.semantic_model != "none":
        semantic = metrics.SemanticScorer(cfg.eval.semantic_model)
    per_system: dict[str, dict[str, list[float]]] = {}
    summary: dict[str, dict[str, float]] = {}
    for s in systems:
        scores = metrics.rouge_per_example(list(s.predictions), refs)
        if semantic is not None:
            scores["semantic"] = semantic.score(list(s.predictions), refs)
        if cfg.eval.bertscore:
            scores["bertscore"] = metrics.bertscore_per_example(list(s.predictions), refs)
        per_system[s.name] = scores
        summary[s.name] = {k: float(np.mean(v)) for k, v in scores.items()}
        summary[s.name].update(metrics.length_stats(list(s.predictions), refs))
    comparisons = {
        f"{a} - {b}": {
            m: metrics.paired_bootstrap(per_system[b][m], per_system[a][m], samples=cfg.eval.bootstrap_samples,
                                        seed=cfg.seed)
            for m in COMPARED if m in per_system[a]
        }
        for a, b in comparison_pairs([s.name for s in systems])
    }
    return {
        "n_examples": len(examples),
        "data": {"source": cfg.data.source, "split": cfg.data.eval_split},
        "semantic_model": semantic.name if semantic else None,
        "systems": {s.name: {"source": s.source, **summary[s.name]} for s in systems},
        "comparisons": comparisons,
        "per_example": per_system,
    }


def comparison_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(a, b) pairs reported as a - b: post-processing against raw output, and the evaluated model
    against the baseline (raw with raw, post-processed with post-processed)."""
    pairs = [(f"{n}+post", n) for n in ("model", "baseline") if n in names and f"{n}+post" in names]
    pairs += [(f"model{x}", f"baseline{x}") for x in ("", "+post") if f"baseline{x}" in names]
    return pairs


def _write(stage_dir: Path, cfg: Config, systems: list[System], examples: list[Example], results: dict, tracker) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json_atomic(stage_dir / "results.json", results)
    rows = [
        {"id": ex.id, "reference": ex.references[0], **{s.name: s.predictions[i] for s in systems},
         "rougeL": {s.name: results["per_example"][s.name]["rougeL"][i] for s in systems}}
        for i, ex in enumerate(examples)
    ]
    (stage_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for s in systems:
        (stage_dir / f"predictions-{s.name}.jsonl").write_text(
            "".join(json.dumps({"id": ex.id, "prediction": p}) + "\n" for ex, p in zip(examples, s.predictions)))
    (stage_dir / "samples.md").write_text(_samples_table(rows[:20], [s.name for s in systems]))
    flat = {}
    for name, values in results["systems"].items():
        prefix = "eval/" if name == "model" else f"eval/{name.replace('+', '_')}/"
        flat.update({prefix + k: v for k, v in values.items() if isinstance(v, float)})
    tracker.log_metrics(flat)
    for path in (stage_dir / "results.json", stage_dir / "samples.md", stage_dir / "samples.jsonl"):
        tracker.log_artifact(path)
    checkpoint.mark_complete(stage_dir, to_yaml(cfg))
    _print_table(results)


def _samples_table(rows: list[dict], names: list[str]) -> str:
    def cell(t: str) -> str:
        return t.replace("|", "\\|").replace("\n", " ")

    head = "| id | reference | " + " | ".join(names) + " |\n|" + "---|" * (2 + len(names)) + "\n"
    return head + "".join(f"| {r['id']} | {cell(r['reference'])} | " + " | ".join(cell(r[n]) for n in names) + " |\n"
                          for r in rows)


def _print_table(results: dict) -> None:
    names = list(results["systems"])
    keys = [k for k in HEADLINE if k in results["systems"][names[0]]] + ["len/pred_words_mean"]
    lines = [f"{'system':<16}" + "".join(f"{k.replace('len/pred_words_mean', 'words'):>11}" for k in keys)]
    for n in names:
        lines.append(f"{n:<16}" + "".join(f"{results['systems'][n][k]:>11.4f}" for k in keys))
    for comp, by_metric in results["comparisons"].items():
        for m, b in by_metric.items():
            lines.append(f"{comp} [{m}]: diff {b['mean_diff']:+.4f}, 95% CI [{b['ci_low']:+.4f}, {b['ci_high']:+.4f}], "
                         f"p={b['p_value']:.3f}")
    print(f"Evaluation on {results['n_examples']} examples ({results['data']['source']}:{results['data']['split']})")
    print("\n".join(lines), flush=True)
