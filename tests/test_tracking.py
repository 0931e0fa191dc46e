"""MLflow records under resumes and failures: params of a resumed run, a tracking store that fails
mid-run (one message, no traceback)."""

import mlflow
import pytest
from conftest import TINY

from lastmile.cli import main
from lastmile.tracking import MlflowTracker


def test_a_resumed_run_records_changed_settings_without_rewriting_the_old_ones(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    first = MlflowTracker(uri, "e", "sft", tags={}, params={"sft.lr": 1, "seed": 0}, resume_run_id=None)
    run_id = first.run_id
    first.end()
    for params in ({"sft.lr": 2, "seed": 0, "sft.new": 3}, {"sft.lr": 2, "seed": 0, "sft.new": 3},
                   {"sft.lr": 5, "seed": 0, "sft.new": 3}):
        MlflowTracker(uri, "e", "sft", tags={}, params=params, resume_run_id=run_id).end()
    run = mlflow.MlflowClient(uri).get_run(run_id)
    # the first value stays; each resume that changed something adds resume<k>/<key>; unchanged reruns add nothing
    assert run.data.params == {"sft.lr": "1", "seed": "0", "sft.new": "3", "resume1/sft.lr": "2", "resume2/sft.lr": "5"}
    assert run.data.tags["lastmile.resume1.changed"] == "sft.lr" and "lastmile.resume3.changed" not in run.data.tags


@pytest.mark.parametrize("error", ["mlflow", "requests"])
def test_a_tracking_store_failing_mid_run_is_one_message(error, tmp_path, monkeypatch, capsys):
    from lastmile.stages import sft

    def fail(cfg):
        if error == "mlflow":
            from mlflow.exceptions import MlflowException

            raise MlflowException("API request to http://10.0.0.9:5000/api/2.0/mlflow/runs/log-batch failed\nmore")
        import requests

        raise requests.exceptions.ConnectionError("Connection refused")

    monkeypatch.setattr(sft, "run", fail)
    code = main(["sft", "--config", str(TINY), f"output_dir={tmp_path}", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert code == 69 and "Traceback" not in err
    assert f"the MLflow tracking store (sqlite:///{tmp_path.resolve()}/mlflow.db) failed during the run" in err
    assert "rerun the same command to resume" in err and "more" not in err.split("failed during the run")[1]


@pytest.mark.parametrize("store", ["reachable", "on-the-full-disk-too"])
def test_a_full_disk_during_a_checkpoint_is_reported_as_one_and_the_run_is_ended(store, tmp_path, monkeypatch, capsys):
    """ENOSPC while SFT writes its first checkpoint: exit 74 naming the path, never a tracking failure
    (exit 69, SQLAlchemy's advice on autoflush) even when ending the MLflow run fails on the same disk."""
    import errno
    import json

    from mlflow.exceptions import MlflowException

    from lastmile import checkpoint, tracking

    def full(folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    def store_full(self, status="FINISHED"):
        raise MlflowException("(raised as a result of Query-invoked autoflush; consider using a session.no_autoflush "
                              "block if this flush is occurring prematurely)\n(sqlite3.OperationalError) database or "
                              "disk is full")

    monkeypatch.setattr(checkpoint, "write_manifest", full)
    if store != "reachable":
        monkeypatch.setattr(tracking.MlflowTracker, "end", store_full)
    out = tmp_path / "run"
    try:
        code = main(["sft", "--config", str(TINY), f"output_dir={out}"])
        err = capsys.readouterr().err
        run_id = json.loads((out / "sft" / "mlflow_run.json").read_text())["run_id"]
        status = mlflow.MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db").get_run(run_id).info.status
    finally:
        monkeypatch.undo()
        while mlflow.active_run():  # the run whose end was made to fail is still open in this process
            mlflow.end_run("KILLED")
    partial = out / "sft" / "checkpoints" / "step-0000004.partial"
    assert code == 74, err[-2000:]
    assert f"No space left on device while writing {partial}" in err and "Traceback" not in err
    assert "tracking store" not in err and "autoflush" not in err
    assert not partial.exists()  # the useless partial checkpoint is gone: its space is free again
    if store == "reachable":
        assert status == "FAILED" and "could not be marked" not in err
    else:
        assert status == "RUNNING"
        assert f"The MLflow run {run_id} could not be marked FAILED either ((sqlite3.OperationalError) database " in err


def test_a_full_disk_under_the_store_is_reported_as_a_full_disk(tmp_path, monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    from lastmile.stages import sft

    def fail(cfg):
        raise MlflowException("(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT INTO metrics ...]")

    monkeypatch.setattr(sft, "run", fail)
    code = main(["sft", "--config", str(TINY), f"output_dir={tmp_path}", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert code == 74 and "Traceback" not in err
    assert f"No space left on device while writing {tmp_path}/mlflow.db" in err


@pytest.mark.parametrize("store", ["reachable", "on-the-full-disk-too"])
def test_a_full_disk_in_a_pipeline_ends_the_parent_run_or_says_it_could_not(store, tmp_path, monkeypatch, capsys):
    import errno
    import json

    from mlflow.exceptions import MlflowException

    from lastmile.stages import sft

    out = tmp_path / "run"

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "sft" / "checkpoints"))

    def store_full(self, run_id, status="FINISHED", end_time=None):
        raise MlflowException("(sqlite3.OperationalError) database or disk is full")

    monkeypatch.setattr(sft, "run", full)
    if store != "reachable":
        monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", store_full)
    code = main(["pipeline", "--config", str(TINY), f"output_dir={out}"])
    err = capsys.readouterr().err
    monkeypatch.undo()
    parent = json.loads((out / "pipeline_run.json").read_text())["run_id"]
    status = mlflow.MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db").get_run(parent).info.status
    assert code == 74 and f"No space left on device while writing {out}/sft/checkpoints" in err, err[-2000:]
    assert "Traceback" not in err and "tracking store" not in err
    if store == "reachable":
        assert status == "FAILED" and "could not be marked" not in err
    else:
        assert status == "RUNNING" and f"The MLflow run {parent} could not be marked FAILED either" in err


@pytest.mark.slow
def test_a_full_disk_under_checkpoint_and_store_ends_the_run(tmp_path):
    """The issue's case, on a real full disk: SFT with its default store on a 6 MB tmpfs. The failed
    checkpoint write's file is closed and deleted, so the run can still be marked FAILED."""
    import contextlib
    import sqlite3

    from conftest import run_cli, small_tmpfs

    with small_tmpfs(tmp_path / "small") as mnt:
        proc = run_cli("sft", "--config", str(TINY), f"output_dir={mnt / 'run'}")
        with contextlib.closing(sqlite3.connect(mnt / "run" / "mlflow.db")) as con:  # closed, or umount is refused
            statuses = [s for (s,) in con.execute("SELECT status FROM runs")]
    assert proc.returncode == 74, proc.stderr[-2000:]
    assert f"No space left on device while writing {mnt}/run/sft/checkpoints/step-0000004.partial" in proc.stderr
    assert "Traceback" not in proc.stderr and "autoflush" not in proc.stderr and "tracking store" not in proc.stderr
    assert statuses == ["FAILED"]
