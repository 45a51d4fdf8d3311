"""Partition reference time (TIME_REF_COUNT, 10 MHz) and the reference TSC page parameters.

Handlers never read a clock: they call ``PartitionAccess.reference_time()`` (so replay sees
the recorded value). :class:`ReferenceClock` is what the machine uses to *implement* that
method. Two sources:

* ``ReferenceClock.from_guest_tsc(read_tsc, tsc_hz)``: reference time is derived from the
  guest TSC with exactly the TSC page formula, ``((tsc * scale) >> 64) + offset``, so a guest
  that mixes RDTSC-through-the-page and RDMSR(TIME_REF_COUNT) sees one consistent, monotonic
  clock on every VP (the guest TSC is synchronized across VPs by KVM).
* ``ReferenceClock.from_monotonic(read_ns)``: host monotonic nanoseconds / 100. The TSC
  page is then reported invalid (sequence 0) because the guest TSC is not the source, and
  the guest falls back to the MSR, as the TLFS prescribes.

Both start at 0 when the clock is created ("initialized to zero when the partition is created").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vsmtrace.vmm.hyperv.hvdef import (
    HV_NS_PER_REFERENCE_TICK,
    HV_REFERENCE_TIME_HZ,
    HV_REFERENCE_TSC_SCALE_SHIFT,
    HV_REFERENCE_TSC_SEQUENCE_INVALID,
    HvReferenceTscPage,
)

_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class TscPageParams:
    """Scale and offset of the reference TSC page (``None`` params = page invalid)."""

    scale: int
    offset: int  # signed 64-bit

    def reference_time(self, tsc: int) -> int:
        """The TLFS formula, computed exactly as the guest does (128-bit product, high half)."""
        return (((tsc * self.scale) >> HV_REFERENCE_TSC_SCALE_SHIFT) + self.offset) & _U64

    def page(self, sequence: int) -> HvReferenceTscPage:
        return HvReferenceTscPage(tsc_sequence=sequence, tsc_scale=self.scale, tsc_offset=self.offset)


def tsc_scale_for(tsc_hz: int) -> int:
    """64.64 fixed-point multiplier that turns TSC ticks into 100 ns units."""
    if tsc_hz <= 0:
        raise ValueError("TSC frequency must be positive")
    return (HV_REFERENCE_TIME_HZ << HV_REFERENCE_TSC_SCALE_SHIFT) // tsc_hz


def guest_tsc_params(read_tsc: Callable[[], int], tsc_hz: int) -> TscPageParams:
    """TSC page parameters of a reference counter that reads 0 now ("zero when the partition is created")."""
    scale = tsc_scale_for(tsc_hz)
    start = (read_tsc() * scale) >> HV_REFERENCE_TSC_SCALE_SHIFT
    return TscPageParams(scale=scale, offset=-start)


def invalid_tsc_page() -> HvReferenceTscPage:
    """A page telling the guest to use TIME_REF_COUNT instead."""
    return HvReferenceTscPage(tsc_sequence=HV_REFERENCE_TSC_SEQUENCE_INVALID)


class ReferenceClock:
    """The partition's 10 MHz reference counter, built by the machine from one clock source."""

    def __init__(self, now_100ns: Callable[[], int], tsc_params: TscPageParams | None, tsc_hz: int | None) -> None:
        self._now = now_100ns
        self._tsc_params = tsc_params
        self._tsc_hz = tsc_hz
        self._last = 0

    @classmethod
    def from_guest_tsc(cls, read_tsc: Callable[[], int], tsc_hz: int) -> ReferenceClock:
        params = guest_tsc_params(read_tsc, tsc_hz)
        return cls(lambda: params.reference_time(read_tsc()), params, tsc_hz)

    @classmethod
    def from_monotonic(cls, read_ns: Callable[[], int], tsc_hz: int | None = None) -> ReferenceClock:
        start = read_ns()
        return cls(lambda: (read_ns() - start) // HV_NS_PER_REFERENCE_TICK, None, tsc_hz)

    def reference_time(self) -> int:
        """Current TIME_REF_COUNT; never goes backwards even if the source jitters."""
        now = self._now()
        if now < self._last:
            now = self._last
        self._last = now
        return now

    def reference_time_ns(self) -> int:
        return self.reference_time() * HV_NS_PER_REFERENCE_TICK

    def tsc_page_params(self) -> TscPageParams | None:
        """Parameters for the reference TSC page, or None if the page must read as invalid."""
        return self._tsc_params

    @property
    def tsc_frequency_hz(self) -> int | None:
        return self._tsc_hz


def reference_ticks_to_ns(ticks: int) -> int:
    return ticks * HV_NS_PER_REFERENCE_TICK


def ns_to_reference_ticks(ns: int) -> int:
    return ns // HV_NS_PER_REFERENCE_TICK
