"""What every stage does first and last: ranks, stop signals, the stage's identity, and its record.

A stage's identity is its own config section, the settings every stage shares (model, data, prompt,
seed, precision) and the identities of its inputs (the models it starts from). A finished stage is
skipped only when its identity is unchanged; a changed identity is an error naming what changed,
never the old result under a new label. The identity is written into the published model
(`lastmile_identity.json`), so the next stage's identity follows from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lastmile import checkpoint, distributed, faults, preemption
from lastmile.config import Config, flatten, to_dict, to_yaml
from lastmile.distributed import DistInfo
from lastmile.errors import ConfigError

log = logging.getLogger(__name__)

IDENTITY_FILE = "lastmile_identity.json"
SHARED = ("seed", "precision", "model", "data", "prompt")
SECTIONS = {"sft": ("sft",), "reward_model": ("rm",), "ppo": ("ppo",)}
# What a stage is evaluated on or how often it saves: not what it learns from.
IGNORED = {"data.eval_split", "data.max_eval_examples", "ppo.parity_bound"} | {
    f"{s}.{k}" for s in ("sft", "rm", "ppo") for k in ("save_every", "keep_checkpoints", "log_every", "num_samples")}


@dataclass(frozen=True)
class StageStart:
    dist: DistInfo
    stage_dir: Path
    done: bool
    identity: dict[str, Any]


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
    for path in (done_file, stage_dir / "identity.json"):
        old = _read_identity(path)
        if old is not None and not same_identity(old, ident):
            raise ConfigError(
                f"{stage_dir} holds a {label} run made with other settings or inputs: {describe_change(old, ident)}. "
                f"Its results do not belong to this configuration. Use a new output_dir, or delete {stage_dir} to "
                f"run {label} again.")
    done = done_file.is_file()
    if done and dist.is_main:
        print(f"{label} already complete in {stage_dir} with these settings and inputs; skipping.", flush=True)
    if not done and dist.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json_atomic(stage_dir / "identity.json", ident)
    distributed.barrier()
    return StageStart(dist, stage_dir, done, ident)


def stage_identity(cfg: Config, stage: str, inputs: dict[str, str | None]) -> dict[str, Any]:
    tree = to_dict(cfg)
    settings = {k: v for k, v in flatten({s: tree[s] for s in SHARED + SECTIONS.get(stage, ())}).items()
                if k not in IGNORED}
    inputs_id = {name: model_identity(path) for name, path in sorted(inputs.items()) if path}
    body = json.dumps({"stage": stage, "settings": settings, "inputs": inputs_id}, sort_keys=True, default=str)
    return {"stage": stage, "hash": hashlib.sha256(body.encode()).hexdigest()[:16], "settings": settings,
            "inputs": inputs_id}


def same_identity(old: dict, new: dict) -> bool:
    """Equal hashes, or the only differences are settings a later lastmile version added, at their
    defaults (an older record lacks them; the stage was made with what the default now does)."""
    if old.get("hash") == new.get("hash"):
        return True
    a, b = old.get("settings"), new.get("settings", {})
    if a is None or old.get("inputs", {}) != new.get("inputs", {}):
        return False
    defaults = flatten(to_dict(Config()))
    changed = {k for k in set(a) | set(b) if a.get(k, _ABSENT) != b.get(k, _ABSENT)}
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


def _read_identity(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return data.get("identity", data) if isinstance(data, dict) else None


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
    Then the checkpoints go: a finished stage never resumes, and they are most of its disk."""
    checkpoint.write_json_atomic(stage_dir / "run.json", {"run_id": run_id, "stage": stage})
    if (stage_dir / "model").is_dir():
        checkpoint.write_json_atomic(stage_dir / "model" / IDENTITY_FILE, identity)
    faults.point("stage.before_done")
    checkpoint.write_json_atomic(stage_dir / checkpoint.DONE_FILE, {"identity": identity})
    for leftover in ("checkpoints", "best"):
        shutil.rmtree(stage_dir / leftover, ignore_errors=True)
