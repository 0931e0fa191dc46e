"""Stop requests from the scheduler (SIGUSR1 before a Slurm time limit, SIGTERM on preemption).

The handler only sets a flag; the training loop checks it between steps, so the current step
finishes, a checkpoint is written, the MLflow run is closed as interrupted, and the process
exits with EXIT_PREEMPTED for the job script to requeue.
"""

from __future__ import annotations

import logging
import signal

import torch

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
_requested: list[str] = []


def install() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _handle)


def _handle(signum, frame) -> None:
    name = signal.Signals(signum).name
    if not _requested:
        log.warning("received %s: finishing the current step, then checkpointing and exiting", name)
    _requested.append(name)


def requested() -> bool:
    """True on every rank when any rank got a stop signal (a collective when distributed)."""
    flag = torch.tensor([1.0 if _requested else 0.0])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.cuda.is_available():
            flag = flag.cuda()
        torch.distributed.all_reduce(flag)
    return bool(flag.item() > 0)


class Preempted(Exception):
    """Raised after the checkpoint is written; the CLI exits with EXIT_PREEMPTED."""
