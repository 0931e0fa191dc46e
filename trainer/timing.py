"""Wall-clock time per phase of an iteration, for the `time/<phase>_s` metrics and bench/episode_cost.py.

    timer = PhaseTimer(device)
    with timer("generation"):
        ...
    timer.metrics()  # {"time/generation_s": 1.23}

On a GPU the device is synchronized at both ends of a phase, so queued kernels are charged to the
phase that launched them (a small cost, paid only when timing a CUDA device).
"""

from __future__ import annotations

import contextlib
import time

import torch


class PhaseTimer:
    def __init__(self, device: torch.device | None = None):
        self.cuda = device is not None and device.type == "cuda"
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}_s": v for k, v in self.seconds.items()}


NULL = contextlib.nullcontext


def phase(timer: PhaseTimer | None, name: str):
    """`with phase(timer, "reference"):` times when a timer is given, else does nothing."""
    return timer(name) if timer is not None else NULL()
