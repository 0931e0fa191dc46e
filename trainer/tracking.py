"""Experiment tracking: MLflow on rank 0, a null tracker elsewhere or when disabled.

Default store: `sqlite:///<output_dir>/mlflow.db` (no server). Any tracking URI works, e.g. a
shared `mlflow server`. One run per stage, tagged with the pipeline id, stage, git sha and the
upstream stage's run; a resumed stage re-opens its own run (the id is kept in trainer state). The
default store moves with a copied or moved output_dir (relocate_store).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any, Protocol

from lastmile.config import PROJECT_ROOT, Config, flatten, to_dict

log = logging.getLogger(__name__)

# MLflow run status for a run stopped on purpose (preemption, Ctrl-C) that will resume later.
INTERRUPTED = "KILLED"


class Tracker(Protocol):
    run_id: str | None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    run_id = None

    def log_metrics(self, metrics, step=None):
        pass

    def log_params(self, params):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_text(self, text, name):
        pass

    def set_tags(self, tags):
        pass

    def end(self, status="FINISHED"):
        pass


class MlflowTracker:
    def __init__(self, uri: str, experiment: str, run_name: str, *, tags: dict[str, str], params: dict[str, Any],
                 resume_run_id: str | None, artifact_location: str | None = None):
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        if artifact_location and mlflow.get_experiment_by_name(experiment) is None:
            # a local store keeps its artifacts beside it, not in ./mlruns of whatever directory we run from
            mlflow.create_experiment(experiment, artifact_location=artifact_location)
        mlflow.set_experiment(experiment)
        self._logged_through: dict[str, int] = {}  # a reopened run drops (metric, step)s it already holds
        if resume_run_id:
            self._run = mlflow.start_run(run_id=resume_run_id)
            mlflow.set_tag("lastmile.resumed", "true")
            client = mlflow.MlflowClient()
            self._logged_through = _last_logged_steps(client, resume_run_id)
            _log_params_on_resume(client, resume_run_id, params)
        else:
            self._run = mlflow.start_run(run_name=run_name, tags=tags)
            for chunk in _chunks(params, 100):
                mlflow.log_params(chunk)
        self.run_id = self._run.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        at = 0 if step is None else step  # MLflow stores a step-less metric at step 0
        metrics = {k: v for k, v in metrics.items() if at > self._logged_through.get(k, -1)}
        if metrics:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._mlflow.log_params({k: str(v) for k, v in params.items()})
        except MlflowException:  # a resumed run already has them (MLflow params are immutable)
            pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self._mlflow.log_text(text, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def end(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


@contextlib.contextmanager
def closing(tracker: Tracker):
    """End the run as FINISHED, as interrupted (a stop signal: it will resume), or as FAILED."""
    from lastmile import preemption

    try:
        yield tracker
    except BaseException as e:
        stopped = isinstance(e, (preemption.Preempted, KeyboardInterrupt))
        end_after_error(tracker, INTERRUPTED if stopped else "FAILED", e)
        raise
    tracker.end("FINISHED")


def end_after_error(tracker: Tracker, status: str, error: BaseException) -> None:
    """End the run as `status` while `error` propagates. The store may fail for the same reason the
    stage did (a full disk under both the checkpoint and mlflow.db): that failure must not replace
    `error`, the cause, so it becomes a note on it, which the CLI adds to its message."""
    store_log = logging.getLogger("mlflow.store.db.utils")  # logs a traceback before it raises; the note says it
    level = store_log.level
    store_log.setLevel(logging.CRITICAL)
    try:
        if status == INTERRUPTED:
            tracker.set_tags({"lastmile.status": "interrupted"})
        tracker.end(status)
    except Exception as e:  # any failure of the store, while the real error is reported
        log.debug("ending MLflow run %s failed", tracker.run_id, exc_info=True)
        error.add_note(f"The MLflow run {tracker.run_id} could not be marked {status} either ({first_line(e)}); it "
                       "may still show RUNNING.")
    finally:
        store_log.setLevel(level)


def first_line(e: BaseException) -> str:
    """The line of an error worth showing: SQLAlchemy puts its advice on autoflush before the cause."""
    lines = [x for x in str(e).strip().splitlines() if x.strip() and not x.startswith("(raised as a result of")]
    return (lines[0] if lines else type(e).__name__)[:300]


def _last_logged_steps(client, run_id: str) -> dict[str, int]:
    """metric -> the highest step it already has in the run."""
    keys = client.get_run(run_id).data.metrics.keys()
    return {k: max((m.step for m in client.get_metric_history(run_id, k)), default=-1) for k in keys}


def _log_params_on_resume(client, run_id: str, params: dict[str, Any]) -> None:
    """A resumed run records what its config now says. MLflow params cannot change value, so a changed
    setting is logged as `resume<k>/<key>` (k counts the resumes that changed something) and listed in
    the tag `lastmile.resume<k>.changed`; settings the run never had are logged as they are."""
    import re

    old = client.get_run(run_id).data.params
    new = _param_strings(params)
    resumes = sorted({int(m.group(1)) for key in old if (m := re.match(r"resume(\d+)/", key))})
    latest = dict(old)  # each setting's value as last recorded: the newest resume<j>/ record wins
    for j in resumes:
        latest |= {key[len(f"resume{j}/"):]: v for key, v in old.items() if key.startswith(f"resume{j}/")}
    added = {key: v for key, v in new.items() if key not in old}
    changed = {key: v for key, v in new.items() if key in old and latest[key] != v}
    k = (resumes[-1] if resumes else 0) + 1
    items = list((added | {f"resume{k}/{key}": v for key, v in changed.items()}).items())
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[_param(key, v) for key, v in items[i : i + 100]])
    if changed:
        client.set_tag(run_id, f"lastmile.resume{k}.changed", ", ".join(sorted(changed))[:5000])
        log.info("resumed with changed settings, logged as resume%d/<key>: %s", k, ", ".join(sorted(changed)))


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)


def _param_strings(d: dict[str, Any]) -> dict[str, str]:
    """Values as MLflow stores params: strings of at most 6000 characters, None as "null"."""
    return {k: "null" if v is None else str(v)[:6000] for k, v in d.items()}


def _chunks(d: dict[str, Any], n: int):
    items = list(_param_strings(d).items())
    for i in range(0, len(items), n):
        yield dict(items[i : i + n])


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


def artifact_location(cfg: Config) -> str | None:
    """Where a new experiment keeps artifacts: beside a local store (<output_dir>/mlartifacts); a
    server decides for itself (None)."""
    uri = tracking_uri(cfg)
    local = uri.startswith(("sqlite:///", "file:")) or "://" not in uri
    return (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri() if local else None


def default_store(cfg: Config) -> Path | None:
    """The sqlite file when the store is the default one, `<output_dir>/mlflow.db` (set or implied), else None."""
    uri = tracking_uri(cfg)
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):].split("?")[0])
    here = Path(cfg.output_dir) / "mlflow.db"
    return db if db.resolve() == here.resolve() else None


def relocate_store(cfg: Config) -> None:
    """A copied or moved output_dir brings its store, and MLflow keeps artifact locations absolute: the
    experiment and every run in it would go on writing artifacts to the old folder's mlartifacts/.
    Point them at this output_dir's mlartifacts/ (which holds the copied artifacts), and the tag
    `lastmile.output_dir` at this folder. Only the default store is touched: it belongs to output_dir."""
    import sqlite3
    from urllib.parse import unquote, urlparse

    db = default_store(cfg)
    new = artifact_location(cfg)
    if db is None or new is None or not db.is_file():
        return
    moved: list[str] = []
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as con, con:
            moved += [loc for (loc,) in con.execute("SELECT artifact_location FROM experiments")
                     if loc and loc.startswith("file:") and loc.endswith("/mlartifacts") and loc != new]
            for old in moved:
                con.execute("UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?", (new, old))
                con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                            "WHERE substr(artifact_uri, 1, ?) = ?", (new, len(old) + 1, len(old) + 1, old + "/"))
                old_dir, new_dir = (str(Path(unquote(urlparse(u).path)).parent) for u in (old, new))
                con.execute("UPDATE tags SET value = ? WHERE key = 'lastmile.output_dir' AND value = ?",
                            (new_dir, old_dir))
                log.warning("output_dir was copied or moved: its MLflow store %s kept artifacts in %s; now in %s",
                            db, old, new)
    except sqlite3.Error as e:
        from lastmile.errors import UserError

        raise UserError(f"the MLflow store {db} was copied or moved with output_dir, and its runs keep artifacts in "
                        f"{', '.join(moved) or 'the old folder'}; pointing them at {new} failed ({e}). Close other "
                        f"programs using {db} and rerun, or set tracking.enabled=false.") from None


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def pipeline_id(cfg: Config) -> str:
    """From config, else the id stored in output_dir by the first stage, else a new one."""
    if cfg.tracking.pipeline_id:
        return cfg.tracking.pipeline_id
    path = Path(cfg.output_dir) / "pipeline_id"
    if path.is_file():
        return path.read_text().strip()
    new = uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
    return new


def upstream_run_id(output_dir: str | Path, stage: str) -> str | None:
    """The MLflow run id an earlier stage recorded in <output_dir>/<stage>/run.json."""
    import json

    path = Path(output_dir) / stage / "run.json"
    return json.loads(path.read_text()).get("run_id") if path.is_file() else None


def start(cfg: Config, *, stage: str, is_main: bool, resume_run_id: str | None = None,
          upstream_run_id: str | None = None, run_name: str | None = None, parent_run_id: str | None = None,
          record: Path | None = None) -> Tracker:
    """Open the stage's run. `record` (a file in the stage folder) keeps the run id from the first
    start, so a stage killed before its first checkpoint reopens its run instead of starting a second."""
    if not (is_main and cfg.tracking.enabled):
        return NullTracker()
    if resume_run_id is None and record is not None and record.is_file():
        import json

        resume_run_id = json.loads(record.read_text()).get("run_id")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # users who point at ./mlruns
    tags = {
        "lastmile.pipeline_id": pipeline_id(cfg),
        "lastmile.stage": stage,
        "lastmile.git_sha": git_sha(),
        "lastmile.output_dir": str(Path(cfg.output_dir).resolve()),
    }
    if upstream_run_id:
        tags["lastmile.upstream_run_id"] = upstream_run_id
    parent = parent_run_id or cfg.tracking.parent_run_id
    if parent:
        tags["mlflow.parentRunId"] = parent  # shows the stage as a child of the pipeline run in the UI
    uri = tracking_uri(cfg)
    relocate_store(cfg)
    tracker = MlflowTracker(
        uri, cfg.tracking.experiment, run_name or stage,
        tags=tags, params=flatten(to_dict(cfg)), resume_run_id=resume_run_id, artifact_location=artifact_location(cfg),
    )
    log.info("MLflow run %s (%s) at %s", tracker.run_id, stage, uri)
    if record is not None:
        from lastmile.checkpoint import write_json_atomic

        record.parent.mkdir(parents=True, exist_ok=True)
        # the default store by its name in output_dir, so that a copied output_dir names only itself
        where = {"store": "mlflow.db"} if default_store(cfg) else {"uri": uri}
        write_json_atomic(record, {"run_id": tracker.run_id, **where})
    return tracker
