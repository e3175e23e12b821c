"""Fault injection for the crash tests: ``KDISTILL_KILL_AT=event:n`` makes the process
SIGKILL itself the n-th time it reaches ``event`` (``step``, ``evaluate``, ``checkpoint``,
the last one between writing a checkpoint's temporary file and renaming it into place).

Unset, this costs one dictionary lookup per call; nothing else in kdistill reads it.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def reached(event: str) -> None:
    """Mark ``event``; die here if ``KDISTILL_KILL_AT`` says so."""
    target = os.environ.get("KDISTILL_KILL_AT")
    if not target:
        return
    name, _, count = target.partition(":")
    if name != event:
        return
    _counts[event] = _counts.get(event, 0) + 1
    if _counts[event] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
