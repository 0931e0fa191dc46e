"""Evaluate stage: generate summaries on held-out data and score them, raw and post-processed.

    lastmile evaluate --config trainer/configs/tiny.yaml output_dir=runs/tiny
    lastmile evaluate --config X eval.model=path/to/model data.source=my_data/ data.eval_split=test
    lastmile evaluate --config X eval.predictions=preds.jsonl       # score your own system's output

Systems: the evaluated model (default: <output_dir>/sft/model) and optionally a baseline
(`eval.baseline_model`, e.g. the untuned model), each raw and post-processed. Comparisons are paired
bootstrap intervals on the same examples. Every evaluation has its own folder, named for what was
evaluated (`eval/sft/`, `eval/rl_vs_untuned/`, `eval/predictions-<hash>/`): results.json,
samples.md, samples.jsonl, predictions-<system>.jsonl, metrics.png. Generations are cached per
system under eval/generations/, keyed by the model's identity and the generation settings, so a
system is generated once however many comparisons it appears in.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lastmile import checkpoint, distributed, metrics, preemption, seeding, tracking
from lastmile.config import COMPARED, Config, flatten, to_dict  # COMPARED: paired bootstrap a - b, 95% CI
from lastmile.data.predictions import read_predictions
from lastmile.data.records import Example, load_split
from lastmile.distributed import DistInfo
from lastmile.errors import UserError
from lastmile.generation import generate_examples
from lastmile.model_inputs import CAUSAL_LM, check_model_input
from lastmile.plots import plot_histograms, plot_metric_bars
from lastmile.stages.common import model_identity, write_stage_config

log = logging.getLogger(__name__)

HEADLINE = ("rouge1", "rouge2", "rougeL", "rougeLsum", "la_rouge1", "la_rouge2", "la_rougeL", "semantic")
STAGE_LABELS = {"sft": "sft", "ppo": "rl", "reward_model": "rm"}


@dataclass(frozen=True)
class SystemSpec:
    name: str  # "model", "baseline", "untuned", "mle", "rl"
    model: str | None = None
    predictions: str | None = None


@dataclass(frozen=True)
class System:
    name: str  # a spec's name, or "<name>+post"
    source: str  # model path or predictions file
    predictions: tuple[str, ...]


def run(cfg: Config) -> dict:
    """`lastmile evaluate`: the configured model or predictions file, and the optional baseline."""
    primary = SystemSpec("model", model=None if cfg.eval.predictions else (cfg.eval.model or _default_model(cfg)),
                         predictions=cfg.eval.predictions)
    specs = [primary]
    if cfg.eval.baseline_model or cfg.eval.baseline_predictions:
        specs.append(SystemSpec("baseline", model=None if cfg.eval.baseline_predictions else cfg.eval.baseline_model,
                                predictions=cfg.eval.baseline_predictions))
    for spec, field in zip(specs, ("eval.model", "eval.baseline_model")):
        if spec.model:  # a causal LM with its weights, before anything loads (lastmile.model_inputs)
            check_model_input(field, spec.model, CAUSAL_LM)
    names = [s.name for s in specs]
    comparisons = [(f"{n}+post", n) for n in names] + [(f"model{x}", f"baseline{x}") for x in ("", "+post")
                                                       if "baseline" in names]
    label = "_vs_".join(system_label(s) for s in specs)
    return evaluate_systems(cfg, specs, comparisons, Path(cfg.output_dir) / "eval" / label, run_name=f"evaluate:{label}")


def system_label(spec: SystemSpec) -> str:
    """Folder name for what is evaluated: the producing stage, or a content hash."""
    if spec.predictions:
        return f"predictions-{_file_hash(Path(spec.predictions))}"
    ident = Path(spec.model) / "lastmile_identity.json"
    if ident.is_file():
        return STAGE_LABELS.get(json.loads(ident.read_text()).get("stage"), "model")
    if not Path(spec.model).exists():
        return "untuned" if spec.name in ("baseline", "untuned") else Path(spec.model).name
    return f"model-{model_identity(spec.model).split(':')[-1][:8]}"


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def evaluate_systems(cfg: Config, specs: list[SystemSpec], comparisons: list[tuple[str, str]], folder: Path, *,
                     run_name: str, stage: str = "evaluate", parent_run_id: str | None = None) -> dict:
    """Generate (or read) every system, add its post-processed version, score, compare, write `folder`.
    Skipped when `folder` already holds results of exactly these systems and settings."""
    dist = distributed.setup()
    examples = load_split(cfg.data, cfg.data.eval_split, cfg.eval.max_examples or cfg.data.max_eval_examples)
    decoding = replace(cfg, precision=distributed.shared_precision(cfg.precision, dist.device))  # one for all ranks
    ident = _identity(decoding, specs, examples)
    folder = folder_for(folder, ident)
    done = folder / checkpoint.DONE_FILE
    finished = _finished_results(folder) if done.is_file() else None
    if finished is not None:
        if dist.is_main:
            print(f"Evaluation of {', '.join(s.name for s in specs)} unchanged; results in {folder / 'results.json'}")
        return finished
    if done.is_file() and dist.is_main:  # a marker whose results are gone or cut is not done
        print(f"{done} marks this evaluation complete, but {folder / 'results.json'} is missing or unreadable; "
              "evaluating again.", flush=True)
    if dist.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json_atomic(folder / "identity.json", {"identity": ident})
    distributed.barrier()
    tracker = tracking.start(cfg, stage=stage, is_main=dist.is_main, run_name=run_name, record=folder / "mlflow_run.json",
                             upstream_run_id=_upstream(specs), parent_run_id=parent_run_id)
    write_stage_config(cfg, folder, tracker, dist, runtime={"systems": ", ".join(s.name for s in specs),
                                                            "examples": len(examples), "precision": decoding.precision})
    with tracking.closing(tracker):
        systems = []
        for n, spec in enumerate(specs, 1):
            s = _system(spec, decoding, examples, dist)
            systems += [s, System(f"{s.name}+post", s.source, tuple(metrics.postprocess(p) for p in s.predictions))]
            if n < len(specs) and preemption.requested():  # a stop signal: the generations so far are kept
                done = ", ".join(sp.name for sp in specs[:n])
                raise preemption.Preempted(f"stopped after generating {n} of {len(specs)} systems ({done}); the next "
                                           "run reuses their kept generations")
        if not dist.is_main:
            return {}
        results = score_systems(systems, examples, cfg, comparisons) | {"folder": str(folder)}
        _write(folder, systems, examples, results, tracker, bootstrap_samples=cfg.eval.bootstrap_samples, seed=cfg.seed,
               output_dir=Path(cfg.output_dir))
        checkpoint.write_json_atomic(folder / "run.json", {"run_id": tracker.run_id, "stage": stage})
        checkpoint.write_json_atomic(done, {"identity": ident})
    print(f"Results: {folder / 'results.json'}; side by side: {folder / 'samples.md'}", flush=True)
    return results


def _finished_results(folder: Path) -> dict | None:
    """The results of a finished evaluation, or None when results.json is missing or not valid JSON."""
    try:
        return read_results(folder)
    except (OSError, ValueError):
        return None


def folder_for(folder: Path, ident: str) -> Path:
    """`folder`, unless it holds (or began) the evaluation of something else: then `<folder>-<identity>`,
    so that evaluating a second system never overwrites the first and a changed input gets new results."""
    for recorded in (folder / "identity.json", folder / checkpoint.DONE_FILE):
        if recorded.is_file():
            try:
                same = json.loads(recorded.read_text()).get("identity") == ident
            except (json.JSONDecodeError, OSError):
                same = False
            if not same:
                return folder.with_name(f"{folder.name}-{ident[:8]}")
    return folder


def _identity(cfg: Config, specs: list[SystemSpec], examples: list[Example]) -> str:
    """What an evaluation's results depend on: the systems, the evaluation, prompt and data settings, the
    seed, the concrete precision (`cfg` is settled: bf16 decodes and scores otherwise than fp32) and the ids."""
    what = [(s.name, model_identity(s.model) if s.model else _file_hash(Path(s.predictions))) for s in specs]
    settings = {k: v for k, v in flatten(to_dict(cfg)).items()
                if k.startswith(("eval.", "prompt.", "data.", "seed", "precision"))}
    body = json.dumps({"systems": what, "settings": settings, "ids": [e.id for e in examples]}, sort_keys=True,
                      default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _upstream(specs: list[SystemSpec]) -> str | None:
    for s in specs:
        if s.model and (Path(s.model).parent / "run.json").is_file():
            return json.loads((Path(s.model).parent / "run.json").read_text()).get("run_id")
    return None


def _default_model(cfg: Config) -> str:
    path = Path(cfg.output_dir) / "sft" / "model"
    if not (path / "config.json").is_file():
        raise UserError(
            f"eval.model is unset and {path} holds no model. Run `lastmile sft` with the same output_dir first, "
            "or set eval.model=<model path> or eval.predictions=<file.jsonl>."
        )
    return str(path)


def _system(spec: SystemSpec, cfg: Config, examples: list[Example], dist: DistInfo) -> System:
    if spec.predictions:
        return System(spec.name, spec.predictions, tuple(read_predictions(Path(spec.predictions), examples,
                                                                          missing=cfg.eval.missing_predictions)))
    cache = _generation_cache(cfg, spec, examples, dist.device)
    if cache.is_file():
        return System(spec.name, spec.model, tuple(read_predictions(cache, examples)))
    seeding.seed_everything(cfg.seed, stage="evaluate", rank=dist.rank)  # eval.generation.strategy=sample draws
    texts = generate_examples(spec.model, cfg, examples, dist, cfg.eval.generation)
    if dist.is_main:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.write_text("".join(json.dumps({"id": e.id, "prediction": t}) + "\n" for e, t in zip(examples, texts)),
                       encoding="utf-8")
        tmp.replace(cache)
    return System(spec.name, spec.model, tuple(texts))


def _generation_cache(cfg: Config, spec: SystemSpec, examples: list[Example], device) -> Path:
    """Where a system's generations are kept. The key holds the concrete precision (`auto` gives bf16 or
    fp32 by machine): a report finished on another machine than it began on generates every system again
    there, so that the systems it compares were all decoded in one precision."""
    key = json.dumps({"model": model_identity(spec.model), "generation": to_dict(cfg)["eval"]["generation"],
                      "prompt": to_dict(cfg)["prompt"], "precision": distributed.resolve_precision(cfg.precision, device),
                      "data": [cfg.data.source, cfg.data.eval_split], "ids": [e.id for e in examples]}, sort_keys=True)
    return (Path(cfg.output_dir) / "eval" / "generations" /
            f"{spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl")


def score_systems(systems: list[System], examples: list[Example], cfg: Config,
                  comparisons: list[tuple[str, str]]) -> dict:
    """Per-example scores, means, length stats, and paired bootstrap comparisons a - b."""
    refs = [list(ex.references) for ex in examples]
    semantic = metrics.SemanticScorer(cfg.eval.semantic_model) if cfg.eval.semantic_model != "none" else None
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
        summary[s.name].update(metrics.failure_stats(list(s.predictions)))
    compared = {
        f"{a} - {b}": {
            m: metrics.paired_bootstrap(per_system[b][m], per_system[a][m], samples=cfg.eval.bootstrap_samples,
                                        seed=cfg.seed)
            for m in COMPARED if m in per_system[a]
        }
        for a, b in comparisons if a in per_system and b in per_system
    }
    return {
        "n_examples": len(examples),
        "data": {"source": cfg.data.source, "split": cfg.data.eval_split},
        "semantic_model": semantic.name if semantic else None,
        "systems": {s.name: {"source": s.source, **summary[s.name]} for s in systems},
        "comparisons": compared,
        "per_example": per_system,
    }


def mlflow_name(system: str) -> str:
    return system.replace("+", "_")


def _write(folder: Path, systems: list[System], examples: list[Example], results: dict, tracker, *,
           bootstrap_samples: int, seed: int, output_dir: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_results(folder, results, output_dir)
    rows = [{"id": ex.id, "reference": ex.references[0], **{s.name: s.predictions[i] for s in systems},
             "rougeL": {s.name: results["per_example"][s.name]["rougeL"][i] for s in systems}}
            for i, ex in enumerate(examples)]
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for s in systems:
        (folder / f"predictions-{s.name}.jsonl").write_text(
            "".join(json.dumps({"id": ex.id, "prediction": p}) + "\n" for ex, p in zip(examples, s.predictions)),
            encoding="utf-8")
    (folder / "samples.md").write_text(samples_markdown(rows[:20], [s.name for s in systems]), encoding="utf-8")
    flat = {f"eval/{mlflow_name(n)}/{k}": v for n, values in results["systems"].items()
            for k, v in values.items() if isinstance(v, float)}
    for comp, by_metric in results["comparisons"].items():
        a, b = comp.split(" - ")
        for m, r in by_metric.items():
            key = f"eval/delta/{mlflow_name(a)}_vs_{mlflow_name(b)}/{m}"
            flat.update({key: r["mean_diff"], f"{key}_lo": r["ci_low"], f"{key}_hi": r["ci_high"]})
    tracker.log_metrics(flat)
    shown = ("rougeL", "la_rougeL", "semantic")
    per_example = results["per_example"]
    intervals = {n: {k: metrics.mean_interval(per_example[n][k], samples=bootstrap_samples, seed=seed)
                     for k in shown if k in per_example[n]} for n in per_example}
    plot = plot_metric_bars(folder / "metrics.png", {n: {k: v[k] for k in shown if k in v}
                                                     for n, v in results["systems"].items()},
                            title=f"Evaluation on {results['n_examples']} examples", intervals=intervals)
    lengths = plot_histograms(folder / "lengths.png", {
        **{s.name: [float(metrics.n_words(p)) for p in s.predictions] for s in systems},
        "reference": [float(metrics.n_words(ex.references[0])) for ex in examples]},
        title="Summary length", xlabel="words")
    for path in (folder / "results.json", folder / "samples.md", folder / "samples.jsonl", plot, lengths):
        tracker.log_artifact(path)
    print_table(results)


def write_results(folder: Path, results: dict, output_dir: Path) -> None:
    """folder/results.json, with the paths inside output_dir (`folder`, the systems' sources) relative to
    it, so that a copied or moved output_dir names only itself; read_results resolves them again."""
    out = output_dir.resolve()

    def relative(path: str) -> str:
        p = Path(path)
        return p.resolve().relative_to(out).as_posix() if p.exists() and p.resolve().is_relative_to(out) else path

    checkpoint.write_json_atomic(folder / "results.json", {
        **results, "folder": relative(str(folder)),
        "systems": {n: {**v, "source": relative(v["source"])} for n, v in results["systems"].items()}})


def read_results(folder: Path, *, output_dir: str | Path | None = None) -> dict:
    """folder/results.json with its paths usable here: `folder` is this folder, and a relative source is
    resolved against `output_dir`, by default the one that now holds the folder (its recorded `folder`,
    e.g. eval/sft, says how many levels up). Paths written by older versions (absolute) are returned as
    they are."""
    results = json.loads((folder / "results.json").read_text())
    if not isinstance(results, dict) or not isinstance(results.get("systems", {}), dict):
        raise ValueError(f"{folder / 'results.json'} is not an evaluation's results")
    recorded, here = Path(str(results.get("folder") or "/")), folder.resolve()
    relative = not recorded.is_absolute() and 0 < len(recorded.parts) <= len(here.parents)
    out = Path(output_dir) if output_dir else here.parents[len(recorded.parts) - 1] if relative else None

    def resolved(path):
        is_path = out is not None and isinstance(path, str) and not Path(path).is_absolute()
        return str(out / path) if is_path and (out / path).exists() else path

    return {**results, "folder": str(folder),
            "systems": {n: {**v, "source": resolved(v["source"])} if isinstance(v, dict) and "source" in v else v
                        for n, v in results.get("systems", {}).items()}}


def samples_markdown(rows: list[dict], names: list[str]) -> str:
    """One section per example: the reference, then each system's output (readable as raw text)."""
    out = []
    for r in rows:
        out.append(f"## {r['id']}\n\n**reference**: {r['reference']}\n")
        out += [f"**{n}** (ROUGE-L {r['rougeL'][n]:.3f}): {r[n]}\n" for n in names]
    return "\n".join(out)


def print_table(results: dict) -> None:
    names = list(results["systems"])
    keys = [k for k in HEADLINE if k in results["systems"][names[0]]] + ["len/pred_words_mean"]
    lines = [f"{'system':<16}" + "".join(f"{k.replace('len/pred_words_mean', 'words'):>11}" for k in keys)]
    for n in names:
        lines.append(f"{n:<16}" + "".join(f"{results['systems'][n][k]:>11.4f}" for k in keys))
    for comp, by_metric in results["comparisons"].items():
        for m, b in by_metric.items():
            lines.append(f"{comp} [{m}]: {b['mean_diff']:+.4f}, 95% CI [{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]")
    print(f"Evaluation on {results['n_examples']} examples ({results['data']['source']}:{results['data']['split']}); "
          "a - b with a paired-bootstrap 95% interval: an interval that excludes 0 is a real difference")
    print("\n".join(lines), flush=True)
