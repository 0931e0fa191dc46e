"""The whole pipeline in one command: SFT -> reward model -> [best-of-n] -> PPO -> evaluation and the report.

    lastmile pipeline --config trainer/configs/demo.yaml
    lastmile pipeline --config trainer/configs/tiny.yaml output_dir=D tracking.uri=sqlite:///D/mlflow.db

One MLflow parent run (`pipeline`), one child run per stage. A rerun skips each stage whose identity
(its settings and inputs, see stages/common.py) is unchanged and resumes an interrupted one; a stage
whose identity changed stops the pipeline with a message naming the change. The parent run id is
kept in <output_dir>/pipeline_run.json so that a resumed pipeline reopens the same parent.
"""

from __future__ import annotations

import gc
import json
from dataclasses import replace
from pathlib import Path

from lastmile import checkpoint, distributed, goals, preemption, report, tracking
from lastmile.config import Config, flatten, to_dict
from lastmile.plan import check_run
from lastmile.stages import best_of_n, ppo, reward_model, sft
from lastmile.timing import trim_host_memory


def run(cfg: Config) -> dict:
    dist = distributed.setup()
    check_run(cfg, "pipeline", dist.world_size)  # every stage's settings, before SFT starts
    parent = _open_parent(cfg) if dist.is_main and cfg.tracking.enabled else None
    if dist.is_main:  # the goal as it stands before any result, for the report to say whether it changed
        goals.record(cfg.report.goals, Path(cfg.output_dir))
    ids = distributed.gather_objects(parent)
    cfg = replace(cfg, tracking=replace(cfg.tracking, parent_run_id=ids[0]))
    try:
        for stage in (sft, reward_model, *((best_of_n,) if cfg.best_of_n.in_pipeline else ()), ppo):
            stage.run(cfg)
            distributed.release_engines()  # the finished stage's engines, models and optimizer states
            gc.collect()
            trim_host_memory()  # ... and the heap pages they leave, which the next stage would not reuse
            if parent:
                _adopt(cfg, stage.__name__.rsplit(".", 1)[-1], parent)
        results = report.run(cfg)
    except BaseException as e:
        if parent:
            status = tracking.INTERRUPTED if isinstance(e, (preemption.Preempted, KeyboardInterrupt)) else "FAILED"
            tracking.end_after_error(_ParentRun(cfg, parent), status, e)
        raise
    if parent:
        _ParentRun(cfg, parent).end("FINISHED")
    return results


def _open_parent(cfg: Config) -> str:
    """The pipeline's parent run: reopened on a rerun, created otherwise (rank 0)."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    tracking.relocate_store(cfg)  # a copied output_dir's store still names the old folder
    client = mlflow.MlflowClient()
    record = Path(cfg.output_dir) / "pipeline_run.json"
    if record.is_file():
        run_id = json.loads(record.read_text())["run_id"]
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "lastmile.resumed", "true")
        return run_id
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment,
                                                                     artifact_location=tracking.artifact_location(cfg))
    run = client.create_run(exp_id, run_name="pipeline", tags={
        "lastmile.pipeline_id": tracking.pipeline_id(cfg), "lastmile.stage": "pipeline",
        "lastmile.git_sha": tracking.git_sha(), "lastmile.output_dir": str(Path(cfg.output_dir).resolve())})
    params = [mlflow.entities.Param(k, "null" if v is None else str(v)[:6000]) for k, v in flatten(to_dict(cfg)).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    checkpoint.write_json_atomic(record, {"run_id": run.info.run_id})
    return run.info.run_id


def _adopt(cfg: Config, stage: str, parent: str) -> None:
    """A stage finished before the pipeline started (e.g. `lastmile sft` run alone, then `lastmile
    pipeline` in the same output_dir) has a run of its own: nest it under the parent run, so that the
    pipeline's run shows every stage. Runs in another store, or already nested, are left as they are."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = tracking.upstream_run_id(cfg.output_dir, stage)
    if run_id is None:
        return
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    try:
        tags = client.get_run(run_id).data.tags
    except MlflowException:
        return
    if "mlflow.parentRunId" not in tags:
        client.set_tag(run_id, "mlflow.parentRunId", parent)
        client.set_tag(run_id, "lastmile.adopted_by_pipeline", "true")


class _ParentRun:
    """The parent run as far as ending it goes (tracking.end_after_error takes a Tracker)."""

    def __init__(self, cfg: Config, run_id: str):
        self.cfg, self.run_id = cfg, run_id

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        client = mlflow.MlflowClient(tracking.tracking_uri(self.cfg))
        for k, v in tags.items():
            client.set_tag(self.run_id, k, v)

    def end(self, status: str = "FINISHED") -> None:
        import mlflow

        mlflow.MlflowClient(tracking.tracking_uri(self.cfg)).set_terminated(self.run_id, status=status)
