"""Fault injection for the crash tests: ``KDISTILL_KILL_AT=event:n`` makes the process SIGKILL
itself the n-th time it reaches ``event``; ``event:n:INT`` sends SIGINT instead (a Ctrl-C at
exactly that instant). Events: ``step``, ``evaluate``, ``checkpoint`` (between writing a file's
temporary copy and renaming it into place), ``cache`` (each batch of a teacher-output cache
build), ``finish`` (a phase's extra files written, its ``done.json`` not yet) and ``report``
(every phase finished, the report not yet measured).

Unset, this costs one dictionary lookup per call; nothing else in kdistill reads it.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def reached(event: str) -> None:
    """Mark ``event``; die (or be interrupted) here if ``KDISTILL_KILL_AT`` says so."""
    target = os.environ.get("KDISTILL_KILL_AT")
    if not target:
        return
    name, _, rest = target.partition(":")
    if name != event:
        return
    count, _, how = rest.partition(":")
    _counts[event] = _counts.get(event, 0) + 1
    if _counts[event] != int(count or 1):
        return
    if how == "INT" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # A process started in the background by a non-interactive shell inherits SIGINT ignored
        # (and Python then installs no KeyboardInterrupt handler): deliver the Ctrl-C as a
        # foreground terminal would, or the crash tests pass or fail by how CI was launched.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    os.kill(os.getpid(), signal.SIGINT if how == "INT" else signal.SIGKILL)
