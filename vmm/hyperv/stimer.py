"""Synthetic timers 0-3 of one (VP, VTL), driven by partition reference time.

The machine supplies a :class:`vmm.timers.TimerScheduler`: ``arm(deadline_ns, callback) -> handle``
and ``cancel(handle)``. ``deadline_ns`` is partition reference time in nanoseconds
(``TIME_REF_COUNT * 100``), so the service must run on the same clock as
``PartitionAccess.reference_time()``. The live machine uses host threads; deterministic
mode (and the tests) use :class:`vmm.timers.ManualTimerService`, which fires due callbacks when told
the time. A deadline already in the past fires as soon as the service runs, which is the
TLFS "expires immediately".

Expiry: message mode posts HvMessageTypeTimerExpired (timer index, expiration time,
delivery time) to the configured SINT of the same VP/VTL through its dedicated buffer (one
in flight per timer; an expiry while the previous message is still queued is dropped, as
a missed period). Direct mode asserts the configured APIC vector. One-shot timers clear
their enable bit; periodic ones re-arm at ``expiration + period``, skipping missed periods
when the VP fell more than a period behind (both lazy and non-lazy timers: this VMM does
not modulate periods; the lazy bit is stored and reported).

Callbacks may run on a timer thread: every entry point runs under the partition lock the
facade hands in.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from vsmtrace.vmm.events import EventKind, EventSink
from vsmtrace.vmm.hyperv.errors import GpFault
from vsmtrace.vmm.hyperv.hvdef import (
    HV_NS_PER_REFERENCE_TICK,
    HV_STIMER_COUNT,
    HvMessage,
    HvMessageType,
    HvStimerConfig,
    HvTimerMessagePayload,
)
from vsmtrace.vmm.hyperv.synic import Synic
from vsmtrace.vmm.timers import TimerScheduler
from vsmtrace.vmm.vp import PartitionAccess


@dataclass
class SyntheticTimer:
    """One STIMERx: its two MSRs plus the armed deadline (reference ticks)."""

    index: int
    config: int = 0
    count: int = 0
    deadline: int | None = None
    handle: object | None = None
    generation: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.config & HvStimerConfig.ENABLE)

    @property
    def periodic(self) -> bool:
        return bool(self.config & HvStimerConfig.PERIODIC)

    @property
    def direct(self) -> bool:
        return bool(self.config & HvStimerConfig.DIRECT_MODE)

    @property
    def sint(self) -> int:
        return (self.config >> HvStimerConfig.SINT_SHIFT) & HvStimerConfig.SINT_MASK

    @property
    def apic_vector(self) -> int:
        return (self.config >> HvStimerConfig.APIC_VECTOR_SHIFT) & HvStimerConfig.APIC_VECTOR_MASK

    @property
    def name(self) -> str:
        return f"stimer{self.index}"


@dataclass
class SyntheticTimers:
    """The four synthetic timers of one VP at one VTL."""

    partition: PartitionAccess
    vp: int
    vtl: int
    synic: Synic
    service: TimerScheduler
    sink: EventSink
    lock: threading.RLock
    direct_mode_allowed: bool = True
    timers: list[SyntheticTimer] = field(default_factory=lambda: [SyntheticTimer(i) for i in range(HV_STIMER_COUNT)])

    def read_config(self, index: int) -> int:
        return self.timers[index].config

    def read_count(self, index: int) -> int:
        return self.timers[index].count

    def write_config(self, index: int, value: int, msr: int) -> None:
        if value & HvStimerConfig.RSVDZ:
            raise GpFault(msr, "reserved STIMER_CONFIG bits set")
        if value & HvStimerConfig.DIRECT_MODE and not self.direct_mode_allowed:
            raise GpFault(msr, "direct synthetic timers are not advertised")
        t = self.timers[index]
        self._cancel(t)
        t.config = value
        self._fix_enable(t)
        if t.enabled:
            self._arm(t)

    def write_count(self, index: int, value: int) -> None:
        t = self.timers[index]
        self._cancel(t)
        t.count = value
        if value == 0:
            t.config &= ~HvStimerConfig.ENABLE
        elif t.config & HvStimerConfig.AUTO_ENABLE:
            t.config |= HvStimerConfig.ENABLE
        self._fix_enable(t)
        if t.enabled:
            self._arm(t)

    def cancel_all(self) -> None:
        for t in self.timers:
            self._cancel(t)

    @staticmethod
    def _fix_enable(t: SyntheticTimer) -> None:
        """TLFS: an enabled message-mode timer with SINTx 0 is disabled immediately."""
        if t.enabled and not t.direct and t.sint == 0:
            t.config &= ~HvStimerConfig.ENABLE

    def _cancel(self, t: SyntheticTimer) -> None:
        t.generation += 1
        if t.handle is not None:
            self.service.cancel(t.handle)
        t.handle = None
        t.deadline = None

    def _arm(self, t: SyntheticTimer, deadline: int | None = None) -> None:
        if t.count == 0:
            return
        if deadline is None:
            deadline = self.partition.reference_time() + t.count if t.periodic else t.count
        t.generation += 1
        generation = t.generation
        t.deadline = deadline
        t.handle = self.service.arm(deadline * HV_NS_PER_REFERENCE_TICK, lambda: self._expired(t.index, generation))

    def _expired(self, index: int, generation: int) -> None:
        with self.lock:
            t = self.timers[index]
            if generation != t.generation or not t.enabled or t.deadline is None:
                return  # cancelled or reprogrammed since this callback was armed
            expiration = t.deadline
            t.handle = None
            now = self.partition.reference_time()
            if t.direct:
                self.partition.assert_interrupt(self.vp, self.vtl, t.apic_vector)
            else:
                source = ("stimer", index)
                if not self.synic.has_queued(source):
                    payload = HvTimerMessagePayload(timer_index=index, expiration_time=expiration, delivery_time=now)
                    message = HvMessage.build(HvMessageType.HvMessageTypeTimerExpired, payload.pack())
                    self.synic.post(t.sint, message, source=source)
            if self.sink.enabled:
                self.sink.emit(
                    EventKind.TIMER, self.vp, self.vtl, 0, timer=t.name, deadline_ns=expiration * HV_NS_PER_REFERENCE_TICK
                )
            if t.periodic:
                following = expiration + t.count
                if following <= now:
                    following = now + t.count
                self._arm(t, following)
            else:
                t.config &= ~HvStimerConfig.ENABLE
                t.deadline = None
