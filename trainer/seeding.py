"""Every random seed the trainer uses, derived from `cfg.seed` in one place.

A seed is a function of (seed, stage, step, rank) only, so a resumed run derives at step k exactly
the seeds the interrupted run would have used there: resume is exact. Ranks pass their rank where
they must differ (each samples its own responses) and leave it at 0 where they must agree (the
global data order, a model's random initialization). Hashing the tuple, rather than a formula such
as `seed * 1000 + rank`, keeps the streams of different stages, steps and seeds from colliding.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

# torch and numpy are imported inside the functions that seed them: derive_seed serves modules that
# `lastmile validate` imports without loading torch (data/sampling.py).


def derive_seed(seed: int, *, stage: str, step: int = 0, rank: int = 0) -> int:
    """A 63-bit seed: the first 8 bytes of sha256("seed:stage:step:rank"), big-endian, halved.
    The same arguments give the same seed on every machine and Python version."""
    digest = hashlib.sha256(f"{seed}:{stage}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seed_everything(seed: int, *, stage: str, step: int = 0, rank: int = 0) -> int:
    """Seed torch (CPU and every CUDA device), Python's `random` and NumPy's global generator with
    `derive_seed(seed, stage=stage, step=step, rank=rank)`; returns that seed."""
    import numpy as np
    import torch

    derived = derive_seed(seed, stage=stage, step=step, rank=rank)
    torch.manual_seed(derived)
    random.seed(derived)
    np.random.seed(derived % 2**32)  # NumPy takes 32-bit seeds
    return derived


@contextlib.contextmanager
def seeded(seed: int, *, stage: str, device: torch.device | None = None, step: int = 0,
           rank: int = 0) -> Iterator[None]:
    """torch's generator seeded with `derive_seed(...)` inside the block and restored after it, so
    that building a model (random weights, a new head) gives the same weights whatever ran before
    and leaves the caller's random stream as it was. `device`: a CUDA device whose state to restore."""
    import torch

    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, stage=stage, step=step, rank=rank))
        yield
