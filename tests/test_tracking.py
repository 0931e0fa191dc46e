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
