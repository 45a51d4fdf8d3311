"""Host scheduling of the VMM's helper threads (timers, trace writer and flusher).

Each VP thread wakes a helper thread many times a second (a re-armed timer, a batch
for the trace writer). Under Linux's default policy a freshly woken thread that slept
a while preempts the thread that woke it at once; the helper then finds the GIL held
by that VP thread and blocks again, and on a loaded host the VP thread waits for a
CPU before it gets back to its guest: a profile of a recorded Linux boot showed the VP
thread losing seconds in ``Condition.notify`` (docs/benchmarks.md). SCHED_BATCH keeps
a woken helper from preempting the thread that woke it; it still runs as soon as a CPU
is free, at the same nice level, so timers fire as before on an idle host.
"""

from __future__ import annotations

import os


def helper_thread_policy() -> None:
    """Put the calling thread under SCHED_BATCH (Linux); elsewhere, or if refused, do nothing."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))  # 0: the calling thread on Linux
    except OSError:
        pass
