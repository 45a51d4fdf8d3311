"""Time sources and one-shot timer services for userspace device models.

Device models (the local APIC first, Hyper-V synthetic timers later) never sleep
or spawn threads themselves. They read time through a :class:`Clock` and ask a
:class:`TimerScheduler` to call them back at an absolute deadline on the same
clock. Two schedulers implement that protocol:

* :class:`TimerService` -- live mode. One daemon thread owns a heap of
  ``(deadline_ns, seq, handle)`` and runs callbacks **on that thread**, so every
  device whose callback it runs must protect its state with a lock.
* :class:`ManualTimerService` -- tests and deterministic mode. No thread: the
  owner calls :meth:`ManualTimerService.advance_to` (the machine does it at
  exits) and due callbacks run synchronously in the caller's thread, in
  deadline order.

Callbacks are always invoked with no scheduler lock held, so a callback may arm
or cancel timers (and take its device's lock) without deadlocking against a
thread that holds the device lock and calls :meth:`arm`/:meth:`cancel`.
Cancellation is best effort against a callback that has already been taken off
the heap on the timer thread: a device must check, under its own lock, that the
expiry it is handling is still the one it armed (the APIC uses a generation
number).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vsmtrace.vmm.host_sched import helper_thread_policy

NS_PER_SEC = 1_000_000_000
#: The TSC is a 64-bit counter: it wraps.
TSC_MASK = (1 << 64) - 1

# Rebuild the heap when more than this fraction of its entries are cancelled, so a
# guest that keeps re-arming far-future deadlines cannot grow it without bound.
_COMPACT_MIN_ENTRIES = 64
_COMPACT_CANCELLED_FRACTION = 0.5

log = logging.getLogger(__name__)


class Clock(Protocol):
    """Where device models read time: monotonic nanoseconds and the guest TSC."""

    def now_ns(self) -> int:
        """Monotonic nanoseconds (host time live, virtual time in deterministic mode)."""
        ...

    def tsc(self) -> int:
        """The guest's time-stamp counter at :meth:`now_ns`."""
        ...


class HostClock:
    """Host monotonic time; guest TSC = ``tsc_hz`` x time elapsed since creation.

    The machine may substitute the real guest TSC later; until then this keeps TSC
    and nanoseconds exactly consistent, which TSC-deadline conversion relies on.
    """

    def __init__(self, tsc_hz: int) -> None:
        if tsc_hz <= 0:
            raise ValueError(f"tsc_hz must be positive, got {tsc_hz}")
        self.tsc_hz = tsc_hz
        self._origin_ns = time.monotonic_ns()

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def tsc(self) -> int:
        return (time.monotonic_ns() - self._origin_ns) * self.tsc_hz // NS_PER_SEC


class ManualClock:
    """Virtual time that only moves when told to (tests, deterministic replay).

    TSC is derived from nanoseconds (``ns * tsc_hz // 1e9``) plus the offset a guest's
    write of IA32_TSC set (:meth:`set_tsc`), never stored, so the two can never disagree.
    """

    def __init__(self, tsc_hz: int, start_ns: int = 0) -> None:
        if tsc_hz <= 0:
            raise ValueError(f"tsc_hz must be positive, got {tsc_hz}")
        self.tsc_hz = tsc_hz
        self._now_ns = start_ns
        self._tsc_offset = 0

    def now_ns(self) -> int:
        return self._now_ns

    def tsc(self) -> int:
        return (self._now_ns * self.tsc_hz // NS_PER_SEC + self._tsc_offset) & TSC_MASK

    def set_tsc(self, value: int) -> None:
        """WRMSR IA32_TSC: the TSC reads ``value`` now and keeps counting from there (time itself does not move)."""
        self._tsc_offset = value - self._now_ns * self.tsc_hz // NS_PER_SEC

    def set_ns(self, now_ns: int) -> None:
        """Move time to ``now_ns``; time never goes backwards."""
        if now_ns < self._now_ns:
            raise ValueError(f"clock cannot go back from {self._now_ns} to {now_ns}")
        self._now_ns = now_ns

    def advance(self, delta_ns: int) -> None:
        self.set_ns(self._now_ns + delta_ns)


@dataclass(eq=False)
class TimerHandle:
    """An armed timer; pass it to ``cancel``. Identity, not value, matters."""

    deadline_ns: int
    seq: int
    callback: Callable[[], None] = field(repr=False)
    cancelled: bool = False
    fired: bool = False


class TimerScheduler(Protocol):
    """The one timer-service type: what device models and the Hyper-V emulation arm timers on.

    Implemented by :class:`TimerService` (a host thread), :class:`ManualTimerService`
    (deterministic time, tests), the Hyper-V backend's reference-time adapter and the
    recording and replay wrappers of the emulation boundary.
    """

    def arm(self, deadline_ns: int, callback: Callable[[], None]) -> Any:
        """Call ``callback()`` once the clock reaches ``deadline_ns`` (absolute ns); returns a handle."""
        ...

    def cancel(self, handle: Any) -> None:
        """Forget ``handle``; harmless if it already fired or was cancelled."""
        ...


class _TimerHeap:
    """The heap both services share: ordering, lazy cancellation, compaction."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._cancelled = 0

    def push(self, deadline_ns: int, callback: Callable[[], None]) -> TimerHandle:
        handle = TimerHandle(deadline_ns, next(self._seq), callback)
        heapq.heappush(self._heap, (deadline_ns, handle.seq, handle))
        return handle

    def cancel(self, handle: TimerHandle) -> None:
        if handle.cancelled or handle.fired:
            return
        handle.cancelled = True
        self._cancelled += 1
        if len(self._heap) >= _COMPACT_MIN_ENTRIES and self._cancelled > len(self._heap) * _COMPACT_CANCELLED_FRACTION:
            self._heap = [entry for entry in self._heap if not entry[2].cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def _drop_cancelled_top(self) -> None:
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
            self._cancelled -= 1

    def next_deadline(self) -> int | None:
        self._drop_cancelled_top()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now_ns: int) -> TimerHandle | None:
        """Take the earliest live timer whose deadline is <= ``now_ns``."""
        self._drop_cancelled_top()
        if not self._heap or self._heap[0][0] > now_ns:
            return None
        handle = heapq.heappop(self._heap)[2]
        handle.fired = True
        return handle

    def live_deadlines(self) -> list[int]:
        return sorted(deadline for deadline, _, handle in self._heap if not handle.cancelled)

    def clear(self) -> None:
        for _, _, handle in self._heap:
            handle.cancelled = True
        self._heap.clear()
        self._cancelled = 0


def _run_callback(handle: TimerHandle) -> None:
    """Run one expiry; a device bug must not kill the timer thread or the caller's loop."""
    try:
        handle.callback()
    except Exception:
        log.exception("timer callback for deadline %d raised", handle.deadline_ns)


class TimerService:
    """Live timers: one daemon thread sleeps until the earliest deadline and fires it.

    Callbacks run on the timer thread, one at a time, in deadline order. They must
    be short (the APIC's sets an IRR bit and kicks a VP thread) because a slow one
    delays every later timer.
    """

    def __init__(self, clock: Clock | None = None, *, name: str = "vsmtrace-timers") -> None:
        self._now_ns: Callable[[], int] = clock.now_ns if clock is not None else time.monotonic_ns
        self._heap = _TimerHeap()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def arm(self, deadline_ns: int, callback: Callable[[], None]) -> TimerHandle:
        with self._cv:
            if self._stopped:
                raise RuntimeError("TimerService is stopped")
            handle = self._heap.push(deadline_ns, callback)
            if self._heap.next_deadline() == deadline_ns:
                self._cv.notify()
            return handle

    def cancel(self, handle: TimerHandle) -> None:
        with self._cv:
            self._heap.cancel(handle)

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._heap.clear()
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        helper_thread_policy()  # a re-arm must not hand the CPU straight to this thread
        while True:
            with self._cv:
                handle: TimerHandle | None = None
                while not self._stopped:
                    deadline = self._heap.next_deadline()
                    if deadline is None:
                        self._cv.wait()
                        continue
                    now = self._now_ns()
                    if deadline > now:
                        self._cv.wait(timeout=(deadline - now) / NS_PER_SEC)
                        continue
                    handle = self._heap.pop_due(now)
                    break
                if self._stopped:
                    return
            if handle is not None:
                _run_callback(handle)


class ManualTimerService:
    """Timers that fire only inside :meth:`advance_to`, synchronously, in deadline order.

    Given a :class:`ManualClock`, ``advance_to`` first moves that clock to the new
    time, so callbacks observe ``now_ns() == advance_to``'s argument (a late firing,
    exactly like a live timer thread that woke late); without one the caller keeps
    its clock in step.
    """

    def __init__(self, clock: ManualClock | None = None) -> None:
        self._clock = clock
        self._heap = _TimerHeap()
        self._lock = threading.Lock()
        self._now_ns = clock.now_ns() if clock is not None else 0

    @property
    def now_ns(self) -> int:
        """The time of the last :meth:`advance_to`."""
        return self._now_ns

    def arm(self, deadline_ns: int, callback: Callable[[], None]) -> TimerHandle:
        with self._lock:
            return self._heap.push(deadline_ns, callback)

    def cancel(self, handle: TimerHandle) -> None:
        with self._lock:
            self._heap.cancel(handle)

    def stop(self) -> None:
        with self._lock:
            self._heap.clear()

    def next_deadline(self) -> int | None:
        """Earliest live deadline (the machine can advance straight to it when idle)."""
        with self._lock:
            return self._heap.next_deadline()

    def pending_deadlines(self) -> list[int]:
        with self._lock:
            return self._heap.live_deadlines()

    @property
    def armed(self) -> int:
        """How many timers are armed and not yet fired or cancelled."""
        return len(self.pending_deadlines())

    def advance_to(self, now_ns: int) -> int:
        """Fire every timer due at ``now_ns`` (including ones armed by callbacks); return the count."""
        if now_ns < self._now_ns:
            raise ValueError(f"time cannot go back from {self._now_ns} to {now_ns}")
        if self._clock is not None:
            self._clock.set_ns(now_ns)
        self._now_ns = now_ns
        fired = 0
        while True:
            with self._lock:
                handle = self._heap.pop_due(now_ns)
            if handle is None:
                return fired
            _run_callback(handle)
            fired += 1
