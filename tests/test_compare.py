"""`lastmile compare` against a real `mlflow server` on 127.0.0.1: two evaluations logged over HTTP,
compared by run id, the comparison read back through `mlflow.search_runs`. The server is stopped by
its PID (process group) at the end."""

import json
from pathlib import Path

import pytest
from conftest import TINY, mlflow_server_on, run_cli


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    with mlflow_server_on(f"sqlite:///{root}/mlflow.db", root / "server.log",
                          "--artifacts-destination", str(root / "artifacts")) as uri:
        yield uri


@pytest.mark.slow  # kept out of the default run's 8 minutes: `make test-slow`
def test_compare_two_evaluations_through_a_real_mlflow_server(mlflow_server, tmp_path):
    from lastmile.config import DataConfig
    from lastmile.data.records import load_split

    test = load_split(DataConfig(), "test")[:8]
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps({"id": e.id, "prediction": e.summary}) + "\n" for e in test))
    bad.write_text("".join(json.dumps({"id": e.id, "prediction": " ".join(e.summary.split()[:5])}) + "\n" for e in test))
    out = tmp_path / "out"
    common = [f"output_dir={out}", f"tracking.uri={mlflow_server}", "eval.semantic_model=none",
              "eval.bootstrap_samples=200"]
    for preds in (good, bad):
        proc = run_cli("evaluate", "--config", str(TINY), f"eval.predictions={preds}", *common)
        assert proc.returncode == 0, proc.stderr[-3000:]
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["lastmile"], filter_string="tags.`lastmile.stage` = 'evaluate'")
    assert len(runs) == 2
    ids = list(runs["run_id"])
    proc = run_cli("compare", "--config", str(TINY), *ids, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    comp = mlflow.search_runs(experiment_names=["lastmile"], filter_string="tags.`lastmile.stage` = 'compare'")
    assert len(comp) == 1 and comp.iloc[0]["status"] == "FINISHED"
    assert set(comp.iloc[0]["tags.lastmile.compared_runs"].split(",")) == set(ids)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(comp.iloc[0]["run_id"])}
    assert {"report.md", "report.html", "results.json", "metrics.png"} <= artifacts
    report = next((out / "compare").glob("*/report.md")).read_text()
    assert "Comparison on 8 shared examples" in report and "Paired bootstrap" in report
    result = json.loads(next((out / "compare").glob("*/results.json")).read_text())
    rouge = {k: v["rougeL"] for k, v in result["systems"].items() if k.endswith(":model")}
    assert sorted(rouge.values())[-1] == pytest.approx(1.0) and sorted(rouge.values())[0] < 0.8
    (delta,) = [d["rougeL"] for k, d in result["comparisons"].items() if k.split(" - ")[0].endswith(":model")]
    assert delta["ci_high"] < 0 or delta["ci_low"] > 0  # truncated references differ clearly from the references
    # what the report holds: every system with its failure statistics, intervals, the most different examples
    assert len(result["systems"]) == 4 and result["n_shared"] == 8  # two evaluations x (raw, +post)
    for stats in result["systems"].values():
        assert {"rougeL", "words_mean", "repetition_share", "unfinished_share"} <= set(stats)
    good_key = next(k for k, v in result["systems"].items() if v["rougeL"] == pytest.approx(1.0))
    assert result["systems"][good_key]["words_mean"] > next(v["words_mean"] for v in result["systems"].values()
                                                             if v["rougeL"] < 0.9)
    assert len(result["comparisons"]) == 3 and all("rougeL" in d for d in result["comparisons"].values())
    assert len(result["examples"]) == 5
    md = next((out / "compare").glob("*/report.md")).read_text()
    assert "repetition_share" in md and "Paired bootstrap" in md and "differ most (ROUGE-L)" in md
    html = next((out / "compare").glob("*/report.html")).read_text()
    assert html.count("<table>") == 2 and '<img src="metrics.png">' in html


def test_compare_refuses_unknown_sources(tmp_path):
    proc = run_cli("compare", "--config", str(TINY), str(tmp_path / "nowhere"), f"output_dir={tmp_path}",
                   "tracking.enabled=false")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is neither an evaluation folder" in proc.stderr


def test_compare_reads_evaluation_folders(tmp_path):
    from lastmile.config import DataConfig
    from lastmile.data.records import load_split

    test = load_split(DataConfig(), "test")[:8]
    out = tmp_path / "out"
    folders = []
    for name, cut in (("a", 100), ("b", 3)):
        preds = tmp_path / f"{name}.jsonl"
        preds.write_text("".join(json.dumps({"id": e.id, "prediction": " ".join(e.summary.split()[:cut])}) + "\n"
                                 for e in test))
        proc = run_cli("evaluate", "--config", str(TINY), f"output_dir={out}", f"eval.predictions={preds}",
                       "eval.semantic_model=none", "eval.bootstrap_samples=100", "tracking.enabled=false")
        assert proc.returncode == 0, proc.stderr[-2000:]
        folders.append(next(p for p in (out / "eval").glob("predictions-*") if p not in folders))
    proc = run_cli("compare", "--config", str(TINY), *map(str, folders), f"output_dir={out}", "tracking.enabled=false",
                   "eval.bootstrap_samples=100")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(next((out / "compare").glob("*/results.json")).read_text())
    delta = next(d for k, d in results["comparisons"].items() if k.endswith(f"- {next(iter(results['systems']))}")
                 and ":model - " in k and "+post" not in k.split(" - ")[0])
    assert delta["rougeL"]["ci_high"] < 0  # the truncated system is worse, and the interval says so


def test_sources_with_the_same_folder_name_keep_apart(tmp_path):
    from lastmile.stages.compare import Evaluation, unique_labels

    def ev(path, label=None):  # a folder, or (with a label) an MLflow run id
        if label is None:
            (tmp_path / path).mkdir(parents=True, exist_ok=True)
        return Evaluation(label or Path(path).name, str(tmp_path / path), None, (), {}, (), {})

    got = unique_labels([ev("main/eval/rl"), ev("abl/a/eval/rl"), ev("abl/b/eval/rl"), ev("x/eval/sft"),
                         ev("y", label="run"), ev("z", label="run")])
    assert [e.label for e in got] == ["main/eval/rl", "a/eval/rl", "b/eval/rl", "sft", "run#1", "run#2"]


def test_training_curves_of_compared_rl_systems(tmp_path):
    from lastmile.stages.compare import Evaluation, training_curves

    evaluations = []
    for arm, slope in (("a", 0.01), ("b", -0.01)):
        stage = tmp_path / arm / "ppo"
        (stage / "model").mkdir(parents=True)
        (stage / "history.json").write_text(json.dumps({
            "history": [{"iteration": i, "reward/score_mean": slope * i} for i in range(1, 4)],
            "evals": [{"iteration": i, "eval/policy/la_rougeL": 0.3 + slope * i} for i in (2, 3)]}))
        ev = tmp_path / arm / "eval" / "rl"
        ev.mkdir(parents=True)
        (ev / "results.json").write_text(json.dumps({"systems": {"model": {"source": str(stage / "model")},
                                                                 "model+post": {"source": str(stage / "model")}}}))
        evaluations.append(Evaluation(arm, str(ev), None, (), {"model": (), "model+post": ()}, (), {}))
    sft = tmp_path / "sft_eval"  # a system without a PPO stage draws nothing
    sft.mkdir()
    (sft / "results.json").write_text(json.dumps({"systems": {"model": {"source": str(tmp_path / "sft" / "model")}}}))
    evaluations.append(Evaluation("sft", str(sft), None, (), {"model": ()}, (), {}))

    panels = training_curves(evaluations)
    assert set(panels) == {"dev la-ROUGE-L (greedy)", "rollout reward (its own definition)"}
    got = {k: [(i, round(v, 6)) for i, v in pts] for k, pts in panels["dev la-ROUGE-L (greedy)"].items()}
    assert got == {"a": [(2, 0.32), (3, 0.33)], "b": [(2, 0.28), (3, 0.27)]}
    assert [p[0] for p in panels["rollout reward (its own definition)"]["b"]] == [1, 2, 3]


def test_compare_reproduces_the_intervals_of_one_evaluation(tmp_path):
    """Two systems of one evaluation, compared again: the same paired resamples, so the same interval
    as `lastmile evaluate` wrote (negated: compare subtracts the first system)."""
    import numpy as np

    from lastmile import metrics
    from lastmile.config import Config
    from lastmile.stages.compare import Evaluation, compare, shared_ids

    rng = np.random.default_rng(3)
    ids = tuple(f"p{k}" for k in rng.permutation(40))  # not in sorted order
    scores = {n: {m: list(rng.random(40) + (0.05 if n == "model" else 0)) for m in ("rougeL", "la_rougeL", "semantic")}
              for n in ("model", "baseline")}
    one = Evaluation("ev", str(tmp_path), None, ids, {n: ("x",) * 40 for n in scores}, ("r",) * 40, scores)
    other = Evaluation("other", str(tmp_path), None, ids[::-1][:30], {"model": ("x",) * 30}, ("r",) * 30,
                       {"model": {m: v[:30] for m, v in scores["model"].items()}})
    assert shared_ids([one, other]) == [i for i in ids if i in set(ids[::-1][:30])]

    cfg = Config()
    got = compare([one], shared_ids([one]), cfg)["comparisons"]["ev:baseline - ev:model"]
    for m in ("rougeL", "la_rougeL", "semantic"):  # evaluate's "model - baseline"
        want = metrics.paired_bootstrap(scores["baseline"][m], scores["model"][m],
                                        samples=cfg.eval.bootstrap_samples, seed=cfg.seed)
        assert got[m]["mean_diff"] == pytest.approx(-want["mean_diff"])
        assert (got[m]["ci_low"], got[m]["ci_high"]) == pytest.approx((-want["ci_high"], -want["ci_low"]))


def test_compare_shows_only_examples_whose_summaries_differ(tmp_path):
    from lastmile.config import Config
    from lastmile.stages.compare import Evaluation, compare, markdown

    ids = tuple(f"p{k}" for k in range(6))
    texts = {"model": ("same",) * 6, "baseline": ("same",) * 3 + ("other",) + ("same",) * 2}
    scores = {n: {"rougeL": [0.5] * 6} for n in texts}
    scores["baseline"]["rougeL"][1] = 0.9  # a score gap where the texts are equal: p1 is no example
    one = Evaluation("ev", str(tmp_path), None, ids, texts, ("r",) * 6, scores)
    r = compare([one], list(ids), Config())
    assert [ex["id"] for ex in r["examples"]] == ["p3"]

    same = Evaluation("ev", str(tmp_path), None, ids, {n: ("same",) * 6 for n in texts}, ("r",) * 6, scores)
    r = compare([same], list(ids), Config())
    assert r["examples"] == [] and "give the same summary on all 6 shared examples" in markdown(r)
