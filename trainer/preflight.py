"""Checks before anything heavy loads, and the output-dir lock.

A run that cannot write its output dir or reach its tracking store should say so in one paragraph
within seconds, not after loading data and models (an unreachable MLflow server otherwise retries
for minutes). Two runs on one output dir would overwrite each other's checkpoints: the second one
is refused while the first holds the lock.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from lastmile.config import Config
from lastmile.errors import UserError
from lastmile.plan import check_run, world_size_from_env

_held: list = []  # the open lock file, kept for the life of the process
KNOWN_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


# What a stage writes, in units of its model's weights, as measured at the end of `make demo` on
# 2026-12-06 (SmolLM2-135M, 0.54 GB of fp32 weights): SFT's kept checkpoint 4.8x (weights, DeepSpeed's
# fp32 copy and AdamW's two moments) beside its published model; the reward model's checkpoint while it
# trains; PPO's checkpoint (actor and critic) 8.6x beside its model; the pipeline's whole output dir
# 16.0x (8.6 GB), rounded up. Best-of-n, not measured, gets SFT's: it trains as SFT does. Since the demo's
# PPO is critic-free (ReMax), its checkpoint is the actor's alone and the whole dir ended at 11.0x (5.9 GB,
# 2026-12-07); the factors keep the critic's room, which `ppo.advantage=gae` still needs.
DISK_FACTOR = {"sft": 6, "reward-model": 6, "ppo": 10, "pipeline": 17, "best-of-n": 6}


class NoSpace(UserError):
    exit_code = 74  # EX_IOERR, as for a disk that fills during the run


def check(cfg: Config, command: str | None = None) -> None:
    """The command's plan (lastmile.plan: every stage it runs, on the ranks the launcher announced);
    output dir writable, with room for the stage's next checkpoint; tracking store reachable.
    Raises UserError naming the setting, path or URI."""
    if command:
        check_run(cfg, command, world_size_from_env())
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir ({out}) is a file. Point output_dir at a folder (it is created if missing).")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # a name of this process's own: ranks on one filesystem probe at once, and a shared name raced
        # (one rank's unlink removed the other's file: "not writable: No such file or directory")
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-") as probe:
            probe.write(b"ok")
    except OSError as e:
        raise UserError(f"output_dir ({out}) is not writable: {e.strerror}. Choose a folder you can write to, or fix "
                        "its permissions.") from None
    _check_free_disk(cfg, out, DISK_FACTOR.get(command or "", 0))
    if cfg.tracking.enabled:
        _check_tracking(cfg)


def weight_bytes(cfg: Config) -> int:
    """The size of the model's weight files when they are on this machine (0 when unknown: a hub id
    not yet downloaded, a random-init model)."""
    from lastmile.config import OFFLINE_DEFAULT_MODEL

    if cfg.model.random_init:
        return 0
    folder = Path(cfg.model.path)
    if cfg.model.path == OFFLINE_DEFAULT_MODEL:
        from lastmile.models import cache_dir

        folder = cache_dir() / "models" / OFFLINE_DEFAULT_MODEL
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))


def _check_free_disk(cfg: Config, out: Path, factor: int) -> None:
    import shutil

    need = factor * weight_bytes(cfg)
    free = shutil.disk_usage(out).free
    if need and free < need:
        raise NoSpace(f"output_dir ({out}) has {free / 2**30:.1f} GB free; this run needs about {need / 2**30:.1f} GB "
                      f"({factor}x the model's {weight_bytes(cfg) / 2**30:.2f} GB of weights: a checkpoint with its "
                      "optimizer state, and the published model). Free space or move output_dir to a larger disk.")


def _check_tracking(cfg: Config) -> None:
    from lastmile.tracking import tracking_uri

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
        if db is not None:
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
                writable = os.access(db.parent, os.W_OK)
            except OSError:
                writable = False
            if not writable:
                raise UserError(f"tracking.uri ({uri}): {db.parent} is not writable. Point it at a writable folder.")


STALE_BUILD_LOCK_S = 600  # DeepSpeed's CPU ops build in about 30 s here


def clear_stale_build_locks(root: Path | None = None, *, older_than_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove torch extension build locks (`<TORCH_EXTENSIONS_DIR>/<op>/lock`, or
    `~/.cache/torch_extensions/py311_cpu/<op>/lock` where it is unset) left by a process killed
    while building an op (DeepSpeed builds its CPU ops on first use). torch waits on such a lock
    forever, with no message. A lock younger than `older_than_s` may belong to a build in progress and
    is left alone. Returns the removed paths (each logged)."""
    import logging
    import time

    root = root or Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    removed = []
    log = logging.getLogger(__name__)
    # <dir>/<op>/lock where TORCH_EXTENSIONS_DIR is set; <dir>/py311_cpu/<op>/lock in torch's default root
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")] if root.is_dir() else []:
        try:
            age = time.time() - lock.stat().st_mtime
            if age <= older_than_s:
                log.warning("%s exists (%.0f s old): torch waits until another process finishes building that op. "
                            "If none is building (one was killed), delete the file; lastmile removes it when older "
                            "than %.0f s", lock, age, older_than_s)
                continue
            lock.unlink()
        except OSError:
            continue
        removed.append(lock)
        log.warning("removed %s: a build lock %.0f minutes old, left by a process killed while building that op; "
                    "the op is built again", lock, age / 60)
    return removed


def use_environment_build_tools() -> None:
    """Build torch extensions (DeepSpeed's CPU ops) with this environment's tools, into its own cache, as
    `make install` did; idempotent. torch builds an op with the first `ninja` on PATH, in
    TORCH_EXTENSIONS_DIR (default `~/.cache/torch_extensions`, shared by every environment), and builds it
    again, 1-2 minutes on 2 cores, whenever the last build there was made with another ninja version (the
    system's, when the venv is not activated) or from another environment's sources. So: this
    environment's `ninja` (the PyPI package DeepSpeed installs) first on PATH, as activating the venv
    does, and, in a venv, `<venv>/torch_extensions` unless TORCH_EXTENSIONS_DIR is set."""
    import sys

    bin_dir = Path(sys.executable).parent
    path = os.environ.get("PATH", os.defpath)
    if (bin_dir / "ninja").is_file() and path.split(os.pathsep)[0] != str(bin_dir):
        os.environ["PATH"] = os.pathsep.join([str(bin_dir), path])
    if sys.prefix != sys.base_prefix:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def build_cpu_ops() -> str | None:
    """Build DeepSpeed's CPU shared-memory allreduce op, which `init_distributed` otherwise JIT-compiles
    on first use (1-2 minutes on 2 cores, with no progress shown), into this environment's extension
    cache (use_environment_build_tools). `make install` calls it. Returns the op's name, or None where
    the accelerator is not the CPU or the op does not apply (nothing is built)."""
    import deepspeed.ops
    import torch

    if not torch.cuda.is_available():  # as distributed.setup decides
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    use_environment_build_tools()
    clear_stale_build_locks()
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return None
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME):
        return None
    builder.load()
    return builder.absolute_name()


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
