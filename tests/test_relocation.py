"""A copied or moved output_dir is a run folder of its own: a command on the copy reads and writes
only inside the copy, and the original stays byte for byte as it was (issue 21)."""

import contextlib
import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import TINY, run_cli

from lastmile.stages.evaluate import read_results


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _store_paths(db: Path) -> list[str]:
    """Every location the MLflow store keeps: experiments' and runs' artifact locations, the output_dir tags."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        return [x for (x,) in con.execute(
            "SELECT artifact_location FROM experiments WHERE name != 'Default' UNION ALL SELECT artifact_uri FROM runs "
            "UNION ALL SELECT value FROM tags WHERE key = 'lastmile.output_dir'")]


@pytest.mark.slow  # kept out of the default run's 8 minutes: `make test-slow`
def test_a_copied_output_dir_reads_and_writes_only_inside_itself(tiny_sft_run, tmp_path):
    orig, copy = tmp_path / "orig", tmp_path / "copy"
    # without the evaluations other tests may have left in the shared run folder: eval/sft is this test's
    shutil.copytree(tiny_sft_run, orig, ignore=shutil.ignore_patterns("eval", "report"))
    evaluate = ("evaluate", "--config", str(TINY), "eval.semantic_model=none")
    proc = run_cli(*evaluate, f"output_dir={orig}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(orig, copy)
    before = _hashes(orig)

    # the copy: the same evaluation again (skipped), the same one interrupted before its end (it reopens its
    # MLflow run, recorded in the copied folder), and a new one (a new run in the copied store)
    logs = []
    for overrides, undone in (((), False), ((), True), (("eval.bootstrap_samples=100",), False)):
        if undone:
            (copy / "eval" / "sft" / "DONE.json").unlink()
        proc = run_cli(*evaluate, f"output_dir={copy}", *overrides)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs.append(proc.stderr)

    assert _hashes(orig) == before  # nothing of the original was touched, nothing added
    moved = f"its MLflow store {copy.resolve()}/mlflow.db kept artifacts in file://{orig.resolve()}/mlartifacts"
    assert moved in logs[1]  # said once, by the first tracked start in the copy
    folders = sorted(p.name for p in (copy / "eval").iterdir() if (p / "DONE.json").is_file())
    assert folders[0] == "sft" and len(folders) == 2
    for name in folders:
        recorded = json.loads((copy / "eval" / name / "results.json").read_text())
        assert recorded["folder"] == f"eval/{name}" and recorded["systems"]["model"]["source"] == "sft/model"
        results = read_results(copy / "eval" / name)  # as the report and `lastmile compare` read it
        assert results["folder"] == str(copy / "eval" / name)
        assert results["systems"]["model"]["source"] == str(copy.resolve() / "sft" / "model")
    for f in copy.rglob("*.json"):  # the records name no other folder (config.yaml is the config as given)
        text = f.read_text(errors="replace")
        assert str(orig) not in text and str(tiny_sft_run) not in text, f
    locations = _store_paths(copy / "mlflow.db")
    assert locations and all(str(copy.resolve()) in x for x in locations), locations
    run_id = json.loads((copy / "eval" / "sft" / "run.json").read_text())["run_id"]
    logged = list((copy / "mlartifacts").glob(f"{run_id}/artifacts/results.json"))
    assert logged, "the reopened run's artifacts are in the copy's mlartifacts/"


def test_recorded_paths_of_older_versions_are_read_as_they_are(tmp_path):
    folder = tmp_path / "eval" / "sft"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(
        {"folder": "/elsewhere/eval/sft", "systems": {"model": {"source": "/elsewhere/sft/model"},
                                                      "untuned": {"source": "smollm2-135m-instruct"}}}))
    results = read_results(folder)
    assert results["folder"] == str(folder)
    assert {n: v["source"] for n, v in results["systems"].items()} == {
        "model": "/elsewhere/sft/model", "untuned": "smollm2-135m-instruct"}


def test_compare_finds_the_training_curves_of_a_moved_output_dir(tmp_path):
    """results.json names its RL model relative to output_dir: `lastmile compare` on the moved folder
    draws the curves of the moved PPO stage."""
    from lastmile.stages.compare import Evaluation, training_curves

    out = tmp_path / "moved"
    (out / "ppo" / "model").mkdir(parents=True)
    (out / "ppo" / "history.json").write_text(json.dumps({"history": [{"iteration": 1, "reward/score_mean": 0.5}]}))
    (out / "eval" / "rl").mkdir(parents=True)
    (out / "eval" / "rl" / "results.json").write_text(json.dumps(
        {"folder": "eval/rl", "systems": {"model": {"source": "ppo/model"}}}))
    panels = training_curves([Evaluation("rl", str(out / "eval" / "rl"), None, (), {"model": ()}, (), {})])
    assert panels == {"rollout reward (its own definition)": {"rl": [(1, 0.5)]}}
    # an MLflow source: its artifacts are downloaded elsewhere; the run's tag lastmile.output_dir says where it ran
    downloaded = tmp_path / "download"
    shutil.copytree(out / "eval" / "rl", downloaded)
    mlflow_source = Evaluation("run", str(downloaded), "0" * 32, (), {"model": ()}, (), {}, output_dir=str(out))
    assert training_curves([mlflow_source]) == {"rollout reward (its own definition)": {"run": [(1, 0.5)]}}


@pytest.mark.slow
def test_a_copied_pipeline_folder_writes_its_report_in_itself(tiny_pipeline, tmp_path):
    """The issue's case: `cp -r runs/a runs/b`, then the pipeline on runs/b rewrote runs/a/report/report.md."""
    orig = tiny_pipeline[0]
    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)
    before = _hashes(orig)
    proc = run_cli("pipeline", "--config", str(TINY), f"output_dir={copy}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _hashes(orig) == before
    assert f"Report: {copy}/report/report.md" in proc.stdout
    assert all(str(copy.resolve()) in x for x in _store_paths(copy / "mlflow.db"))
