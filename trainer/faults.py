"""Named fault-injection points for the reliability tests (tests/test_faults.py).

`LASTMILE_FAULT=<point>[@<n>]` makes the process SIGKILL itself the n-th time (default 1st) it
reaches that point, e.g. in the middle of a checkpoint write or a model publish, the moments a
random kill rarely hits. Unset (always, outside the tests), a point costs one dictionary lookup.
Points: checkpoint.before_rename, checkpoint.after_rename, publish.after_copy, stage.before_done.
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("LASTMILE_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
