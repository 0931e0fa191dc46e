"""What every stage does first: ranks, stop-signal handling, and the skip of a finished stage."""

from __future__ import annotations

from pathlib import Path

from trainer import checkpoint, distributed, preemption
from trainer.config import Config, to_yaml
from trainer.distributed import DistInfo


def begin(cfg: Config, subdir: str, label: str) -> tuple[DistInfo, Path, bool]:
    """(dist, stage folder, already complete). A stage that finished with exactly this resolved
    config is skipped, so a requeued job picks up at the first unfinished stage."""
    dist = distributed.setup()
    preemption.install()
    stage_dir = Path(cfg.output_dir) / subdir
    done = checkpoint.stage_complete(stage_dir, to_yaml(cfg))
    if done and dist.is_main:
        print(f"{label} already complete in {stage_dir} with this config; skipping.", flush=True)
    return dist, stage_dir, done
