"""``HyperV``: the Hyper-V layer of one partition, as the machine sees it.

Construction (the machine, once per partition)::

    hv = HyperV(partition, policy, timers=..., apic=..., tlb=..., sink=...,
                tsc_page=clock.tsc_page_params, tsc_frequency_hz=..., apic_frequency_hz=...)

Calls from the run loop (all thread-safe; one partition lock serializes them with
timer callbacks):

* ``cpuid_leaves() -> list[(leaf, subleaf, eax, ebx, ecx, edx)]`` - add to the VP's CPUID
  table (and set CPUID.1:ECX[31] iff ``policy.enabled``).
* ``handles_msr(msr) -> bool`` - route RDMSR/WRMSR of this index here.
* ``msr_read(vp, vtl, msr) -> int`` / ``msr_write(vp, vtl, msr, value)`` - may raise
  ``GpFault`` (inject #GP, do not complete), ``GuestCrash`` (show ``report.describe()``,
  stop with non-zero status), ``GuestResetRequest``.
* ``port_is_trap(port) -> bool`` - an OUT to this port is a hypercall; then call
  ``hypercall(vp, vtl) -> HypercallOutcome`` (registers are read and written through the VP
  interface; if ``outcome.retry`` the guest must re-execute the OUT; if ``outcome.exception``
  it was already queued with ``VpAccess.inject_exception``; ``outcome.vtl_action`` is the
  VSM hook's result).
* ``on_apic_eoi(vp, vtl)`` - after any guest EOI at that VTL's APIC (SynIC rescans queues).
* ``is_auto_eoi(vp, vtl, vector) -> bool`` - the APIC asks when it accepts a vector; True
  means "do not set ISR" (auto-EOI SINT).

Services for the VSM stage: ``synic(vp, vtl)``, ``stimers(vp, vtl)``, ``msrs(vp, vtl)``,
``vp_assist_page_gpa(vp, vtl)``, ``hypercall_page_enabled(vtl)``,
``dispatcher.register(spec)`` / ``dispatcher.set_vtl_hook(hook)``, ``post_intercept(...)``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from vsmtrace.vmm.events import EventKind, EventSink, NullSink
from vsmtrace.vmm.hyperv import test_device
from vsmtrace.vmm.hyperv.connections import Connections
from vsmtrace.vmm.hyperv.cpuid import CpuidLeaf, HypervPolicy, hyperv_cpuid_leaves
from vsmtrace.vmm.hyperv.errors import GpFault, GuestCrash
from vsmtrace.vmm.hyperv.handlers import register_default_handlers
from vsmtrace.vmm.hyperv.hvdef import (
    HV_PAGE_MASK,
    HV_SYNIC_INTERCEPTION_SINT_INDEX,
    HV_X64_MSR_RANGE_FIRST,
    HV_X64_MSR_RANGE_LAST,
    HvMessage,
    HvMsr,
    HvStatus,
)
from vsmtrace.vmm.hyperv.hypercall import HypercallDispatcher, HypercallOutcome
from vsmtrace.vmm.hyperv.hypercall_page import HV_HYPERCALL_TRAP_PORT
from vsmtrace.vmm.hyperv.msrs import ApicAccess, CrashMsrs, MsrEnvironment, SyntheticMsrs, VtlPartitionMsrs
from vsmtrace.vmm.hyperv.reference_time import TscPageParams
from vsmtrace.vmm.hyperv.stimer import SyntheticTimers
from vsmtrace.vmm.hyperv.synic import Synic
from vsmtrace.vmm.timers import TimerScheduler
from vsmtrace.vmm.vp import PartitionAccess
from vsmtrace.vmm.vtl_array import VtlArray

#: The partition ID this VMM reports from HvCallGetPartitionId (vsmtrace's choice: any non-zero value works).
VSMTRACE_PARTITION_ID = 0x1


class TlbFlusher(Protocol):
    """Machine service: after ``flush_vps`` returns no listed VP at ``vtl`` uses a stale translation."""

    def flush_vps(self, vp_indices: Sequence[int], vtl: int) -> None: ...


@dataclass
class VpVtlState:
    """Everything Hyper-V keeps for one VP at one VTL."""

    synic: Synic
    stimers: SyntheticTimers
    msrs: SyntheticMsrs


#: Read-only MSRs whose value never changes for a given VP (VP index, frequencies).
FIXED_VALUE_MSRS = (HvMsr.HV_X64_MSR_VP_INDEX, HvMsr.HV_X64_MSR_TSC_FREQUENCY, HvMsr.HV_X64_MSR_APIC_FREQUENCY)


class HyperV:
    """Owns SynICs, timers, MSRs and hypercall dispatch for every (VP, VTL) of a partition."""

    def __init__(
        self,
        partition: PartitionAccess,
        policy: HypervPolicy,
        *,
        timers: TimerScheduler,
        apic: ApicAccess,
        tlb: TlbFlusher,
        sink: EventSink | None = None,
        tsc_page: Callable[[], TscPageParams | None] | None = None,
        tsc_frequency_hz: int | None = None,
        apic_frequency_hz: int | None = None,
        connections: Connections | None = None,
        partition_id: int = VSMTRACE_PARTITION_ID,
        vtl_count: int | None = None,
    ) -> None:
        self.partition = partition
        self.policy = policy.normalized()
        self.sink: EventSink = sink or NullSink()
        self.tlb = tlb
        self.apic = apic
        self.partition_id = partition_id
        self.connections = connections if connections is not None else Connections.with_loopback()
        self.test_device = test_device.HypervTestdevState()
        self.vp_count = partition.vp_count
        self.vtl_count = vtl_count or self.policy.vtl_count
        self.lock = threading.RLock()
        self.on_long_spin_wait: Callable[[int, int], None] | None = None
        #: VSM TLB locks: ``(caller_vp, caller_vtl, target_vps, target_vtls) -> locked``. A flush
        #: hypercall that hits a lock returns ``retry`` (re-executed once the lock is released).
        self.tlb_lock_check: Callable[[int, int, Sequence[int], Sequence[int]], bool] | None = None
        #: VSM: is this VTL enabled for the partition? (None: only VTL0 is.)
        self.vtl_enabled: Callable[[int], bool] | None = None
        self.dispatcher = HypercallDispatcher(partition, self.policy, self.sink)
        self._vtl_msrs = VtlArray(self.vtl_count, lambda _vtl: VtlPartitionMsrs())
        self._env = MsrEnvironment(
            partition=partition,
            policy=self.policy,
            apic=apic,
            vtl_msrs=self._vtl_msrs,
            crash=CrashMsrs(),
            tsc_page=tsc_page or (lambda: None),
            tsc_frequency_hz=tsc_frequency_hz,
            apic_frequency_hz=apic_frequency_hz,
        )
        self._vps: list[VtlArray[VpVtlState]] = [
            VtlArray(self.vtl_count, lambda vtl, vp=vp: self._make_vp_vtl(vp, vtl, timers))
            for vp in range(self.vp_count)
        ]
        if self.policy.enabled:
            register_default_handlers(self)

    def _make_vp_vtl(self, vp: int, vtl: int, timers: TimerScheduler) -> VpVtlState:
        synic = Synic(self.partition, vp, vtl, self.sink)
        stimers = SyntheticTimers(
            self.partition, vp, vtl, synic, timers, self.sink, self.lock, direct_mode_allowed=self.policy.stimer_direct
        )
        return VpVtlState(synic, stimers, SyntheticMsrs(self._env, vp, vtl, synic, stimers))

    # -- per (VP, VTL) accessors ------------------------------------------------------------

    def state(self, vp: int, vtl: int) -> VpVtlState:
        return self._vps[vp][vtl]

    def synic(self, vp: int, vtl: int) -> Synic:
        return self._vps[vp][vtl].synic

    def stimers(self, vp: int, vtl: int) -> SyntheticTimers:
        return self._vps[vp][vtl].stimers

    def msrs(self, vp: int, vtl: int) -> SyntheticMsrs:
        return self._vps[vp][vtl].msrs

    def vtl_msrs(self, vtl: int) -> VtlPartitionMsrs:
        return self._vtl_msrs[vtl]

    def hypercall_page_enabled(self, vtl: int) -> bool:
        return self._vtl_msrs[vtl].hypercall_enabled

    def vp_assist_page_gpa(self, vp: int, vtl: int) -> int | None:
        msrs = self.msrs(vp, vtl)
        return msrs.vp_assist_page & HV_PAGE_MASK if msrs.vp_assist_enabled else None

    def vp_index_from_apic_id(self, apic_id: int) -> int | None:
        """APIC ID → VP index. In this VMM APIC ID == VP index; kept as a method so it can change."""
        return apic_id if 0 <= apic_id < self.vp_count else None

    # -- CPUID -------------------------------------------------------------------------------

    def cpuid_leaves(self) -> list[CpuidLeaf]:
        return hyperv_cpuid_leaves(self.policy, self.vp_count)

    # -- MSRs --------------------------------------------------------------------------------

    def handles_msr(self, msr: int) -> bool:
        return self.policy.enabled and HV_X64_MSR_RANGE_FIRST <= msr <= HV_X64_MSR_RANGE_LAST

    def msr_read(self, vp: int, vtl: int, msr: int) -> int:
        with self.lock:
            try:
                value = self.msrs(vp, vtl).read(msr)
            except GpFault:
                self._emit_msr(vp, vtl, msr, 0, is_write=False, fault=True)
                raise
            self._emit_msr(vp, vtl, msr, value, is_write=False, fault=False)
            return value

    def msr_write(self, vp: int, vtl: int, msr: int, value: int) -> None:
        with self.lock:
            try:
                self.msrs(vp, vtl).write(msr, value)
            except GpFault:
                self._emit_msr(vp, vtl, msr, value, is_write=True, fault=True)
                raise
            except GuestCrash:
                self._emit_msr(vp, vtl, msr, value, is_write=True, fault=False)
                raise
            self._emit_msr(vp, vtl, msr, value, is_write=True, fault=False)

    def fast_msr_values(self, vp: int, vtl: int) -> dict[int, int | None]:
        """Synthetic MSRs a machine may answer at (vp, vtl) without calling in: their reads change no state.

        The value is the fixed answer, or None for TIME_REF_COUNT, which is
        ``PartitionAccess.reference_time()`` (the machine's own reference counter). Only
        MSRs the guest may read are listed; when the machine records it must not use
        this (every read is an MSR event).
        """
        fast: dict[int, int | None] = {}
        with self.lock:
            msrs = self.msrs(vp, vtl)
            for msr in FIXED_VALUE_MSRS:
                try:
                    fast[msr] = msrs.read(msr)
                except GpFault:
                    pass  # not advertised: the read faults, which the emulation reports itself
            if msrs.advertised(HvMsr.HV_X64_MSR_TIME_REF_COUNT):
                fast[HvMsr.HV_X64_MSR_TIME_REF_COUNT] = None
        return fast

    def _emit_msr(self, vp: int, vtl: int, msr: int, value: int, *, is_write: bool, fault: bool) -> None:
        if not self.sink.enabled:
            return
        rip = int(self.partition.vp(vp).get_register(vtl, "rip"))  # type: ignore[arg-type]
        self.sink.emit(EventKind.MSR, vp, vtl, rip, msr=msr, value=value, is_write=is_write, fault=fault)

    # -- hypercalls --------------------------------------------------------------------------

    def port_is_trap(self, port: int) -> bool:
        return self.policy.enabled and self.policy.hypercalls and port == HV_HYPERCALL_TRAP_PORT

    def hypercall(self, vp: int, vtl: int) -> HypercallOutcome:
        with self.lock:
            return self.dispatcher.dispatch(vp, vtl, self._vtl_msrs[vtl].hypercall_enabled)

    # -- interrupts --------------------------------------------------------------------------

    def on_apic_eoi(self, vp: int, vtl: int) -> None:
        with self.lock:
            self.synic(vp, vtl).on_eoi()

    def is_auto_eoi(self, vp: int, vtl: int, vector: int) -> bool:
        with self.lock:
            return self.synic(vp, vtl).is_auto_eoi(vector)

    def test_device_command(self, value: int) -> bool:
        """One command word written to QEMU's Hyper-V test device (see vmm/hyperv/test_device.py)."""
        with self.lock:
            return test_device.apply(self, self.test_device, value)

    def post_intercept(self, vp: int, vtl: int, message: HvMessage) -> HvStatus:
        """Queue a hypervisor (intercept) message to SINT0 of (vp, vtl) - used by VSM."""
        with self.lock:
            return self.synic(vp, vtl).post(HV_SYNIC_INTERCEPTION_SINT_INDEX, message)

    def shutdown(self) -> None:
        """Cancel every armed synthetic timer."""
        with self.lock:
            for per_vtl in self._vps:
                for state in per_vtl:
                    state.stimers.cancel_all()
