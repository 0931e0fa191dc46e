"""Wall-clock time and peak memory per phase of an iteration, for the `time/<phase>_s` and
`mem/<phase>_peak_gb` metrics and bench/episode_cost.py.

    timer = PhaseTimer(device)
    with timer("generation"):
        ...
    timer.metrics()  # {"time/generation_s": 1.23, "mem/generation_peak_gb": 3.1}

On a GPU the device is synchronized at both ends of a phase, so queued kernels are charged to the
phase that launched them (a small cost, paid only when timing a CUDA device), and the memory is
torch's peak allocation on the device during the phase. On a CPU it is the process's peak resident set
during the phase, sampled every 20 ms by a thread that reads /proc/self/statm (Linux; elsewhere no
memory metric): the number `top` and the kernel's OOM killer see, allocator caches included.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import torch

GB = 1e9
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """This process's resident set now (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


_LIBC = None


def trim_host_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim(0)`); False where there is no glibc.

    Freed CPU tensors below glibc's mmap threshold (which rises to 32 MB after the first large free)
    stay in the process's heap: a phase that allocates differently from the last (generation's
    KV cache, then the update's activations) finds the old holes too small and grows the heap again,
    so the resident set climbs with every phase and every stage of a pipeline."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (musl and macOS have none)
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


class _RSSSampler:
    """The largest resident set seen while running: read at start, every `interval` s, and at stop."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak = interval, rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes() or 0)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_bytes() or 0)


class PhaseTimer:
    def __init__(self, device: torch.device | None = None, *, memory: bool = True):
        self.cuda = device is not None and device.type == "cuda"
        self.memory = memory and (self.cuda or rss_bytes() is not None)
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            torch.cuda.synchronize()
            if self.memory:
                torch.cuda.reset_peak_memory_stats()
        sampler = _RSSSampler() if self.memory and not self.cuda else None
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0
            if self.memory:
                peak = sampler.stop() if sampler else torch.cuda.max_memory_allocated()
                self.peak_bytes[phase] = max(self.peak_bytes.get(phase, 0), peak)

    def metrics(self) -> dict[str, float]:
        return ({f"time/{k}_s": v for k, v in self.seconds.items()}
                | {f"mem/{k}_peak_gb": v / GB for k, v in self.peak_bytes.items()})


NULL = contextlib.nullcontext


def phase(timer: PhaseTimer | None, name: str):
    """`with phase(timer, "reference"):` times when a timer is given, else does nothing."""
    return timer(name) if timer is not None else NULL()
