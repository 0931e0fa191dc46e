"""The MLflow UI as users see it, in a real browser: headless Chromium (Debian's `chromium`) renders
the experiment page of the tiny pipeline's store, served by a real `mlflow server` on 127.0.0.1
(stopped by its process group at the end). Marker `slow`; skipped without chromium.

    python -m pytest -m slow tests/test_mlflow_ui.py
    LASTMILE_UI_SCREENSHOT=docs/img/mlflow-runs.png python -m pytest -m slow tests/test_mlflow_ui.py   # also a picture
"""

import os
import shutil
import subprocess

import pytest
from conftest import mlflow_server_on

pytestmark = pytest.mark.slow
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--virtual-time-budget=25000", "--window-size=1500,900", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(BROWSER is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_ui_shows_the_pipeline_run_named_for_what_it_is(tiny_pipeline, tmp_path):
    import mlflow

    out, _ = tiny_pipeline
    with mlflow_server_on(f"sqlite:///{out}/mlflow.db", tmp_path / "server.log") as uri:
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name("lastmile")
        runs = client.search_runs([exp.experiment_id])
        pipeline = next(r for r in runs if r.data.tags.get("lastmile.stage") == "pipeline")
        page = f"{uri}/#/experiments/{exp.experiment_id}/runs/{pipeline.info.run_id}"
        dom = _chromium("--dump-dom", page).stdout
        assert "pipeline" in dom  # the run's name, as the page renders it
        assert "lastmile.pipeline_id" in dom or pipeline.data.tags["lastmile.pipeline_id"] in dom
        assert "report/rl/la_rougeL" in dom  # the report's headline metrics on the parent run
        picture = os.environ.get("LASTMILE_UI_SCREENSHOT")
        if picture:
            listing = f"{uri}/#/experiments/{exp.experiment_id}/runs"  # Model training > Training runs
            proc = _chromium(f"--screenshot={os.path.abspath(picture)}", listing)
            assert os.path.getsize(picture) > 10_000, proc.stderr[-1000:]
