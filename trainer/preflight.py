"""Checks before anything heavy loads, and the output-dir lock.

A run that cannot write its output dir or reach its tracking store should say so in one paragraph
within seconds, not after loading data and models (an unreachable MLflow server otherwise retries
for minutes). Two runs on one output dir would overwrite each other's checkpoints: the second one
is refused while the first holds the lock.
"""

from __future__ import annotations

import fcntl
import os
import urllib.error
import urllib.request
from pathlib import Path

from trainer.config import Config
from trainer.errors import UserError

_held: list = []  # the open lock file, kept for the life of the process
KNOWN_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def check(cfg: Config) -> None:
    """Output dir writable; tracking store reachable. Raises UserError naming the path or URI."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir ({out}) is a file. Point output_dir at a folder (it is created if missing).")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir ({out}) is not writable: {e.strerror}. Choose a folder you can write to, or fix "
                        "its permissions.") from None
    if cfg.tracking.enabled:
        _check_tracking(cfg)


def _check_tracking(cfg: Config) -> None:
    from trainer.tracking import tracking_uri

    uri = tracking_uri(cfg)
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if scheme not in KNOWN_SCHEMES:
        raise UserError(f"tracking.uri ({uri}) is not an MLflow tracking URI. Use sqlite:///path/mlflow.db, "
                        "http://host:port (an mlflow server), or leave it unset for <output_dir>/mlflow.db.")
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as r:
                if r.status == 200:
                    return
                reason = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = str(getattr(e, "reason", e))
        raise UserError(f"tracking.uri ({uri}) does not answer ({reason}). Start the MLflow server, fix the URI, or "
                        "unset tracking.uri to log to <output_dir>/mlflow.db (tracking.enabled=false: no tracking).")
    if scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if db is not None and not os.access(db.parent if db.parent.exists() else Path(cfg.output_dir), os.W_OK):
            raise UserError(f"tracking.uri ({uri}): {db.parent} is not writable. Point it at a writable folder.")


def lock_output_dir(cfg: Config) -> None:
    """Rank 0 holds an exclusive lock on <output_dir>/.lastmile.lock until it exits."""
    # before torch.distributed starts: RANK (deepspeed, torchrun) or SLURM_PROCID (srun) says which rank we are
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) != 0:
        return
    path = Path(cfg.output_dir) / ".lastmile.lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"output_dir ({cfg.output_dir}) is in use by another lastmile run (pid {holder}). Two runs "
                        "would overwrite each other's checkpoints. Wait for it to finish, or use another output_dir.") \
            from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _held.append(f)
