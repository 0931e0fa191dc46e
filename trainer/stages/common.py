"""What every stage does first and last: ranks, stop signals, the stage's identity, and its record.

A stage's identity is its own config section, the settings every stage shares (model, data, prompt,
seed, precision) and the identities of its inputs (the models it starts from). A finished stage is
skipped only when its identity is unchanged; a changed identity is an error naming what changed,
never the old result under a new label. One change is not an error: a longer horizon (`HORIZON`:
sft.epochs / sft.max_steps, ppo.iterations) continues the stage from its final checkpoint, which a
finished stage keeps for that, in the same MLflow run. The identity is written into the published
model (`lastmile_identity.json`), so the next stage's identity follows from it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lastmile import checkpoint, distributed, faults, preemption
from lastmile.config import Config, flatten, to_dict, to_yaml
from lastmile.distributed import DistInfo
from lastmile.errors import ConfigError

log = logging.getLogger(__name__)

IDENTITY_FILE = "lastmile_identity.json"
PRECISION_FILE = "precision.json"  # the concrete precision a stage began with (see `stage_precision`)
# What a rerun of a stage goes on from besides its checkpoints: best-of-n's kept samples, the reward model's
# policy samples. While one of these (or a checkpoint) exists, the stage keeps the precision it began in.
KEPT_WORK = ("samples", "samples.jsonl", "policy_samples.jsonl")
SHARED = ("seed", "precision", "model", "data", "prompt")
# Best-of-n trains with SFT's settings and scores with PPO's reward: both are part of what it learns from.
SECTIONS = {"sft": ("sft",), "reward_model": ("rm",), "ppo": ("ppo",), "best_of_n": ("best_of_n", "sft", "ppo.reward")}
# What a stage is evaluated on or how often it saves: not what it learns from.
IGNORED = {"data.eval_split", "data.max_eval_examples", "ppo.parity_bound", "ppo.parity_max_bound", "best_of_n.in_pipeline"} | {
    f"{s}.{k}" for s in ("sft", "rm", "ppo") for k in ("save_every", "keep_checkpoints", "log_every", "num_samples")}
# Settings an older record may hold that have moved or gone, none of which changed what a stage
# learned (ppo.generation_gather is now deepspeed.generation_gather: generation gives the same tokens).
RETIRED = {"ppo.generation_gather"}
# How long a stage trains. A stage whose identity differs only here continues from its newest (for a
# finished stage: its final, kept) checkpoint instead of being refused; see `continue_stage`.
HORIZON = {"sft": ("sft.epochs", "sft.max_steps"), "ppo": ("ppo.iterations",)}


@dataclass(frozen=True)
class StageStart:
    dist: DistInfo
    stage_dir: Path
    done: bool
    identity: dict[str, Any]
    horizon: str = ""  # the horizon change to continue with, e.g. "sft.max_steps (4 -> 8)"; "" when none
    finished_at: int | None = None  # the step (iteration) a finished stage being continued ended at
    precision: str = "fp32"  # the concrete precision the stage runs in (`stage_precision`)
    given_precision: str = "auto"  # the `precision` setting it was given

    def settled(self, cfg: Config) -> Config:
        """`cfg` with `precision` the concrete one this stage runs in: what the stage's code reads from here on."""
        return replace(cfg, precision=self.precision)

    def as_given(self, cfg: Config) -> Config:
        """`cfg` with the `precision` setting as it was given: what the stage records (config.yaml, MLflow
        params), so that its config.yaml runs the same stage again; the concrete one is `runtime.precision`."""
        return replace(cfg, precision=self.given_precision)


def begin(cfg: Config, subdir: str, label: str, *, inputs: dict[str, str | None] | None = None) -> StageStart:
    """Set up ranks and signals; check this stage's identity against what `output_dir` holds.
    Returns done=True when the stage already finished with this identity (a requeued job skips it)."""
    dist = distributed.setup()
    preemption.install()
    stage_dir = Path(cfg.output_dir) / subdir
    for name, path in (inputs or {}).items():
        problems = checkpoint.verify_manifest(Path(path)) if path and (Path(path) / checkpoint.MANIFEST).is_file() else []
        if problems:
            raise ConfigError(f"the {name} model ({path}) is damaged: {'; '.join(problems[:3])}. Delete {path} and "
                              "rerun the stage that wrote it (it resumes from its last intact checkpoint).")
    ident = stage_identity(cfg, subdir, inputs or {})
    done_file = stage_dir / checkpoint.DONE_FILE
    drop_stale_done(stage_dir, label, is_main=dist.is_main)
    horizon = ""
    for path in (done_file, stage_dir / "identity.json"):
        old = _read_identity(path)
        if old is None or same_identity(old, ident):
            continue
        if not horizon_only(old, ident):
            keys = HORIZON.get(subdir, ())
            hint = (f" Only a change of {' / '.join(keys)} alone continues a run." if
                    any(old.get("settings", {}).get(k) != ident["settings"].get(k) for k in keys) else "")
            raise ConfigError(
                f"{stage_dir} holds a {label} run made with other settings or inputs: {describe_change(old, ident)}. "
                f"Its results do not belong to this configuration. Use a new output_dir, or delete {stage_dir} to "
                f"run {label} again.{hint}")
        horizon = horizon or describe_change(old, ident)
    done_identity = _read_identity(done_file)
    done = done_file.is_file() and (done_identity is None or same_identity(done_identity, ident))
    finished_at = None
    if done_file.is_file() and not done:  # a finished stage to continue: from its kept final checkpoint
        kept = checkpoint.checkpoints(stage_dir / "checkpoints")
        if not kept:
            raise ConfigError(
                f"{stage_dir} holds a finished {label} run and {horizon} would continue it, but its final checkpoint "
                f"({stage_dir / 'checkpoints'}) is gone: deleted by hand, or never kept (lastmile kept none before "
                f"finished stages could be continued). Use a new output_dir, or delete {stage_dir} to run {label} "
                "again with the new settings.")
        finished_at = int(kept[0].name.split("-")[1])
    if done and dist.is_main:
        print(f"{label} already complete in {stage_dir} with these settings and inputs; skipping.", flush=True)
    if not done and not horizon and dist.is_main:  # a horizon change is recorded once `continue_stage` allows it
        stage_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json_atomic(stage_dir / "identity.json", ident)
    precision = cfg.precision if done else stage_precision(cfg, stage_dir, dist, label)
    distributed.barrier()
    return StageStart(dist, stage_dir, done, ident, horizon, finished_at, precision, cfg.precision)


def stage_precision(cfg: Config, stage_dir: Path, dist: DistInfo, label: str) -> str:
    """The concrete precision (`bf16`, `fp32`) a stage runs in. `precision=auto` depends on the machine (a
    CPU with native bf16 or without), so it is resolved when the stage starts and kept in
    <stage_dir>/precision.json; while the stage has work to go on from (a checkpoint, kept samples), a
    run resumed on another machine (a requeue onto other nodes, the next session on another host) goes
    on in the precision it began in, never switching halfway. A stage with nothing kept starts over and
    resolves again. An explicit `bf16` or `fp32` is part of the stage's identity and applies as it is.
    Rank 0 decides for every rank."""
    now = distributed.resolve_precision(cfg.precision, dist.device)
    pin = stage_dir / PRECISION_FILE
    chosen, note = now, ""
    if dist.is_main:
        pinned = _read_json(pin) or {}
        began = pinned.get("resolved")
        if cfg.precision == "auto" and began in ("bf16", "fp32") and _has_kept_work(stage_dir):
            chosen = began
            if began != now:
                note = (f"{label}: {stage_dir} began in {began} (precision=auto, resolved on the machine it started on) "
                        f"and goes on in {began}, so the resumed run is the run it began as; here precision=auto "
                        f"would give {now}. To run in {now} instead, start {label} over: delete {stage_dir} or use "
                        "a new output_dir.")
        elif began != now or pinned.get("setting") != cfg.precision:
            stage_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.write_json_atomic(pin, {"setting": cfg.precision, "resolved": now})
    chosen = distributed.gather_objects(chosen)[0]
    if note:
        print(note, flush=True)
    return chosen


def _has_kept_work(stage_dir: Path) -> bool:
    """A checkpoint or kept samples (`KEPT_WORK`) that a rerun of the stage goes on from."""
    if checkpoint.checkpoints(stage_dir / "checkpoints"):
        return True
    return any(p.is_file() or (p.is_dir() and any(p.iterdir())) for p in (stage_dir / name for name in KEPT_WORK))


def done_problems(stage_dir: Path) -> list[str]:
    """Why a stage marked done is not: its published model missing, or a file of it missing or of
    another size than its manifest says (sizes only: the stage that reads the model checks the sums)."""
    model = stage_dir / "model"
    if not (model / "config.json").is_file():
        return [f"{model} is missing"]
    return checkpoint.verify_manifest(model, checksums=False)


def drop_stale_done(stage_dir: Path, label: str, *, is_main: bool) -> None:
    """A DONE marker whose outputs are missing or damaged is not done: rank 0 removes it and says so,
    and the stage runs again (otherwise the next stage says "run it" and this one says "complete")."""
    done_file = stage_dir / checkpoint.DONE_FILE
    if is_main and done_file.is_file():
        problems = done_problems(stage_dir)
        if problems:
            print(f"{label} in {stage_dir} is marked complete ({done_file.name}), but its outputs do not verify: "
                  f"{'; '.join(problems[:3])}. A stage is done only when its model is intact: removed "
                  f"{done_file.name}, running {label} again.", flush=True)
            done_file.unlink()
    distributed.barrier()  # every rank sees the same marker


def continue_stage(start: StageStart, label: str, *, steps_done: int, total: int, unit: str, engines=()) -> None:
    """After a stage resumed (`steps_done`) with a changed horizon (`total`): refuse a horizon that ends
    before the steps already made, or adds none to a finished stage; else record the new identity,
    reopen a finished stage (its DONE goes) and fit the LR schedules of `engines` to the new horizon."""
    if start.finished_at is not None and steps_done != start.finished_at:
        raise ConfigError(
            f"the final checkpoint of the finished {label} run in {start.stage_dir} (step {start.finished_at}) could "
            f"not be loaded (see the warning above), so {start.horizon} cannot continue it. Use a new output_dir, "
            f"or delete {start.stage_dir} to run {label} again with the new settings.")
    if total < steps_done or (start.finished_at is not None and total == steps_done):
        raise ConfigError(
            f"{start.horizon} gives {total} {unit}, but the {label} run in {start.stage_dir} has already made "
            f"{steps_done}: a changed horizon may only add {unit} to a run. Set one beyond {steps_done} {unit} to "
            f"continue it, or the old value to keep it; or use a new output_dir, or delete {start.stage_dir} to "
            f"run {label} again with these settings.")
    if start.dist.is_main:
        checkpoint.write_json_atomic(start.stage_dir / "identity.json", start.identity)
        (start.stage_dir / checkpoint.DONE_FILE).unlink(missing_ok=True)
        verb = "continuing the finished" if start.finished_at is not None else "resuming the"
        print(f"{verb} {label} run in {start.stage_dir} from {steps_done} to {total} {unit} ({start.horizon})",
              flush=True)
    distributed.barrier()
    for engine in engines:
        _refit_schedule(engine)


def _refit_schedule(engine) -> None:
    """The restored LR scheduler keeps its step count but takes its shape from the new horizon (our
    LambdaLR's lambda is rebuilt, not saved); the optimizer's current LR is still the old schedule's.
    Set it from the new one, so that every step after the old end follows the new horizon's schedule."""
    sched = getattr(engine, "lr_scheduler", None)
    if sched is None or not hasattr(sched, "lr_lambdas"):
        return
    for group, base, lam in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * lam(sched.last_epoch)


def stage_identity(cfg: Config, stage: str, inputs: dict[str, str | None]) -> dict[str, Any]:
    tree = to_dict(cfg)
    sections = {s: functools.reduce(dict.__getitem__, s.split("."), tree) for s in SHARED + SECTIONS.get(stage, ())}
    settings = {k: v for k, v in flatten(sections).items() if k not in IGNORED}
    inputs_id = {name: model_identity(path) for name, path in sorted(inputs.items()) if path}
    body = json.dumps({"stage": stage, "settings": settings, "inputs": inputs_id}, sort_keys=True, default=str)
    return {"stage": stage, "hash": hashlib.sha256(body.encode()).hexdigest()[:16], "settings": settings,
            "inputs": inputs_id}


def same_identity(old: dict, new: dict) -> bool:
    """Equal hashes, or the only differences are settings a later lastmile version added, at their
    defaults (an older record lacks them; the stage was made with what the default now does)."""
    return old.get("hash") == new.get("hash") or _same_settings(old, new)


def horizon_only(old: dict, new: dict) -> bool:
    """The identities differ only in how long the stage trains (HORIZON): a run to continue."""
    keys = HORIZON.get(new.get("stage", ""), ())
    a, b = old.get("settings"), new.get("settings", {})
    if a is None or all(a.get(k, _ABSENT) == b.get(k, _ABSENT) for k in keys):
        return False
    return _same_settings({**old, "settings": _without(a, keys)}, {**new, "settings": _without(b, keys)})


def _without(settings: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in settings.items() if k not in keys}


def _same_settings(old: dict, new: dict) -> bool:
    a, b = old.get("settings"), new.get("settings", {})
    if a is None or old.get("inputs", {}) != new.get("inputs", {}):
        return False
    defaults = flatten(to_dict(Config()))
    changed = {k for k in set(a) | set(b) if a.get(k, _ABSENT) != b.get(k, _ABSENT)} - RETIRED
    return all(k not in a and k in defaults and b.get(k) == defaults[k] for k in changed)


_ABSENT = object()


def model_identity(path: str) -> str:
    """A model's identity: the identity hash of the stage that published it, else the weights' files
    (names, sizes, modification times) for a local folder, else the name (hub id, offline default)."""
    p = Path(path)
    ident = p / IDENTITY_FILE
    if ident.is_file():
        return json.loads(ident.read_text())["hash"]
    if p.is_dir():
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())
        return "files:" + hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    if p.is_file():
        st = p.stat()
        return f"file:{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"name:{path}"


def _read_json(path: Path) -> dict | None:
    """A JSON object from `path`; None when the file is missing, unreadable or holds something else."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return data if isinstance(data, dict) else None


def _read_identity(path: Path) -> dict | None:
    data = _read_json(path)
    return None if data is None else data.get("identity", data)


def describe_change(old: dict, new: dict) -> str:
    """'data.source (aclsum -> data/x); input sft model changed' from two identities."""
    changes = []
    a, b = old.get("settings", {}), new.get("settings", {})
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            changes.append(f"{k} ({a.get(k, 'unset')} -> {b.get(k, 'unset')})")
    ia, ib = old.get("inputs", {}), new.get("inputs", {})
    for k in sorted(set(ia) | set(ib)):
        if ia.get(k) != ib.get(k):
            changes.append(f"input {k} model changed")
    if not changes and old.get("hash") != new.get("hash"):
        changes.append("an older lastmile version recorded this stage without its settings")
    return "; ".join(changes[:8]) + ("; ..." if len(changes) > 8 else "")


def write_stage_config(cfg: Config, stage_dir: Path, tracker, dist: DistInfo, *, runtime: dict[str, Any]) -> None:
    """The resolved config to the stage folder and MLflow, and a short summary on the console."""
    if not dist.is_main:
        return
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "config.yaml").write_text(to_yaml(cfg))
    tracker.log_artifact(stage_dir / "config.yaml")
    tracker.log_params({f"runtime.{k}": v for k, v in runtime.items()})
    from lastmile.tracking import tracking_uri

    where = tracking_uri(cfg) if cfg.tracking.enabled else "off"
    print(f"{stage_dir.name}: model {cfg.model.path}, data {cfg.data.source}, output {stage_dir}, tracking {where}, "
          f"{', '.join(f'{k} {v}' for k, v in runtime.items())}; resolved config in {stage_dir / 'config.yaml'}",
          flush=True)


def mark_done(cfg: Config, stage_dir: Path, stage: str, run_id: str | None, identity: dict[str, Any]) -> None:
    """Rank 0, last: the run id for later stages, the identity into the published model, DONE.
    Then the checkpoints go, most of the stage's disk: all of them, or for a stage that can be continued
    (HORIZON) all but the final one, which a larger horizon resumes from (model + optimizer state)."""
    checkpoint.write_json_atomic(stage_dir / "run.json", {"run_id": run_id, "stage": stage})
    if (stage_dir / "model").is_dir():
        checkpoint.write_json_atomic(stage_dir / "model" / IDENTITY_FILE, identity)
    faults.point("stage.before_done")
    checkpoint.write_json_atomic(stage_dir / checkpoint.DONE_FILE, {"identity": identity})
    shutil.rmtree(stage_dir / "best", ignore_errors=True)  # PPO's best is model/ now; a continued run copies it back
    root = stage_dir / "checkpoints"
    if stage not in HORIZON:
        shutil.rmtree(root, ignore_errors=True)
        return
    checkpoint.remove_partials(root)
    for older in checkpoint.checkpoints(root)[1:]:
        shutil.rmtree(older, ignore_errors=True)
