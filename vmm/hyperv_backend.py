"""Wires the Hyper-V layer (``vmm/hyperv``) into the KVM machine.

The Hyper-V code only knows the VP interface; this module supplies the rest of
what it needs from the machine — the local APICs behind the synthetic APIC
MSRs, real TLB flushes, host timers on the reference clock — and installs the
machine hooks: the hypercall trap port, the synthetic MSR range and the CPUID
leaves 0x40000000+.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from vsmtrace.vmm.devices.hyperv_testdev import HYPERV_TESTDEV_PORT, HYPERV_TESTDEV_PORT_COUNT, HypervTestdev
from vsmtrace.vmm.emulation_io import Boundary, RecordedPartition, RecordedService, RecordedSink, RecordedTimers
from vsmtrace.vmm.hyperv import HyperV
from vsmtrace.vmm.hyperv.cpuid import HypervPolicy, hyperv_cpuid_leaves
from vsmtrace.vmm.hyperv.errors import GpFault, GuestCrash, GuestResetRequest
from vsmtrace.vmm.hyperv.hvdef import (
    HV_HYPERCALL_TRAP_INSN_LEN,
    HV_HYPERCALL_TRAP_PORT,
    HV_X64_MSR_RANGE_FIRST,
    HV_X64_MSR_RANGE_LAST,
)
from vsmtrace.vmm.hyperv.hypercall import HypercallInternalError
from vsmtrace.vmm.hyperv.reference_time import ReferenceClock, guest_tsc_params
from vsmtrace.vmm.timers import TimerHandle, TimerScheduler

if TYPE_CHECKING:
    from vsmtrace.vmm.machine import Machine, VirtualProcessor

PAGE_OFFSET_MASK = 0xFFF


class MachineApics:
    """``ApicAccess`` over the machine's per-(VP, VTL) local APICs."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def _apic(self, vp: int, vtl: int):  # type: ignore[no-untyped-def]
        return self.machine.vps[vp].apics[vtl]

    def eoi(self, vp: int, vtl: int) -> None:
        self._apic(vp, vtl).eoi()
        self.machine.vps[vp].interrupt_hint = True

    def read_icr(self, vp: int, vtl: int) -> int:
        return int(self._apic(vp, vtl).read_icr())

    def write_icr(self, vp: int, vtl: int, value: int) -> None:
        self._apic(vp, vtl).write_icr(value)

    def read_tpr(self, vp: int, vtl: int) -> int:
        return int(self._apic(vp, vtl).tpr)

    def write_tpr(self, vp: int, vtl: int, value: int) -> None:
        apic = self._apic(vp, vtl)
        apic.tpr = value
        owner = self.machine.vps[vp]
        owner.interrupt_hint = True
        if owner.vtl == vtl:
            owner.vcpu.run_struct.cr8 = owner.last_cr8 = apic.cr8


class MachineTlb:
    """``TlbFlusher``: reloading a vCPU's special registers makes KVM drop its cached translations.

    Each target VP reloads before its next guest entry; ``flush_vps`` returns once no
    target can run guest code without having done so (see VirtualProcessor.request_tlb_flush).
    """

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def flush_vps(self, vp_indices: Sequence[int], vtl: int) -> None:
        for index in vp_indices:
            if 0 <= index < len(self.machine.vps):
                self.machine.vps[index].request_tlb_flush(vtl)


class ReferenceTimers:
    """Timers whose deadlines are partition reference time in ns, on host timers.

    The host timer service counts host monotonic ns; the Hyper-V layer counts
    reference time (derived from the guest TSC). Converting at arm time keeps
    both honest: they advance at the same rate and differ only by an offset.
    """

    def __init__(
        self, host: TimerScheduler, reference_ns: Callable[[], int], host_ns: Callable[[], int] = time.monotonic_ns
    ) -> None:
        self.host = host
        self.reference_ns = reference_ns
        self.host_ns = host_ns  # the clock ``host`` counts in (virtual time in --deterministic mode)

    def arm(self, deadline_ns: int, callback: Callable[[], None]) -> TimerHandle:
        delta = deadline_ns - self.reference_ns()
        return self.host.arm(self.host_ns() + max(delta, 0), callback)

    def cancel(self, handle: object) -> None:
        assert isinstance(handle, TimerHandle)
        self.host.cancel(handle)


class HypervBackend:
    """Installs Hyper-V into a machine before boot; creates the :class:`HyperV` once VPs exist."""

    #: The emulation emits its own MSR events (with fault reasons); the machine does not repeat them.
    records_events = True

    def __init__(self, machine: Machine, policy: HypervPolicy) -> None:
        self.machine = machine
        self.policy = policy.normalized()
        self.hv: HyperV | None = None
        self.lock = threading.Lock()
        machine.extra_cpuid = [
            (leaf, subleaf, 0, a, b, c, d) for leaf, subleaf, a, b, c, d in hyperv_cpuid_leaves(self.policy, machine.config.smp)
        ]
        machine.cpuid_policy.hypervisor_bit = True
        machine.msr_handlers.append((HV_X64_MSR_RANGE_FIRST, HV_X64_MSR_RANGE_LAST, self))
        machine.on_vps_created.append(self._create)

    def _create(self) -> None:
        m = self.machine
        assert m.clock is not None and m.timers is not None
        if m.deterministic is not None:
            # Virtual time; the TSC page reads invalid so guests use TIME_REF_COUNT (an exit)
            # instead of scaling a raw RDTSC that re-execution could not reproduce.
            self.reference = ReferenceClock.from_monotonic(m.clock.now_ns, m.tsc_hz)
        else:
            # The counter lives in C (Machine.reference_counter), shared with the fast path
            # that answers TIME_REF_COUNT without Python: one monotonic clock for both.
            params = guest_tsc_params(m.clock.tsc, m.tsc_hz)
            self.reference = ReferenceClock(m.reference_counter(params.scale, params.offset), params, m.tsc_hz)
        m.hyperv_tlb = MachineTlb(m)
        m.reference_clock = self.reference.reference_time
        # Everything the emulation reads or writes goes through the recorded boundary
        # (a pass-through when nothing records), so a trace can be replayed without KVM.
        self.boundary = boundary = Boundary(m.sink, threading.RLock())
        recording = boundary.recording
        self.partition = RecordedPartition(m, boundary) if recording else m
        apic: Any = MachineApics(m)
        tlb: Any = m.hyperv_tlb
        timers: Any = ReferenceTimers(m.timers, self.reference.reference_time_ns, m.clock.now_ns)
        sink: Any = m.sink
        tsc_page = self.reference.tsc_page_params
        if recording:
            apic = RecordedService(apic, boundary, "apic", frozenset({"read_icr", "read_tpr"}))
            tlb = RecordedService(tlb, boundary, "tlb", frozenset())
            timers = RecordedTimers(timers, boundary)
            sink = RecordedSink(m.sink, boundary)
            tsc_page = RecordedService(self.reference, boundary, "clock", frozenset({"tsc_page_params"})).tsc_page_params
        self.sink = sink
        self.hv = HyperV(
            self.partition,
            self.policy,
            timers=timers,
            apic=apic,
            tlb=tlb,
            sink=sink,
            tsc_page=tsc_page,
            tsc_frequency_hz=m.tsc_hz,
            apic_frequency_hz=m.apic_timer_hz,
            vtl_count=len(m.vms),
        )
        boundary.lock = self.hv.lock
        m.trap_ports[HV_HYPERCALL_TRAP_PORT] = self.on_trap
        m.msr_fast_values = self.hv.fast_msr_values  # answered in C when nothing records (docs/hyperv.md)
        m.pio.add(HYPERV_TESTDEV_PORT, HYPERV_TESTDEV_PORT_COUNT, HypervTestdev(self.on_test_device))
        m.on_interrupt_acknowledged = self.on_interrupt_acknowledged
        m.on_apic_eoi = self._on_eoi
        m.on_stop.append(self.shutdown)

    # -- machine hooks -----------------------------------------------------------------------
    def msr_read(self, vp: VirtualProcessor, index: int) -> int:
        assert self.hv is not None
        hv, i, vtl = self.hv, vp.index, vp.vtl
        try:
            return int(self.boundary.entry("msr_read", i, vtl, [i, vtl, index], lambda: hv.msr_read(i, vtl, index)))
        except GpFault as exc:
            from vsmtrace.vmm.machine import MsrFault

            raise MsrFault(index) from exc

    def msr_write(self, vp: VirtualProcessor, index: int, value: int) -> None:
        from vsmtrace.vmm.machine import EXIT_GUEST_FAULT, GuestStop, MsrFault

        assert self.hv is not None
        hv, i, vtl = self.hv, vp.index, vp.vtl
        try:
            self.boundary.entry("msr_write", i, vtl, [i, vtl, index, value], lambda: hv.msr_write(i, vtl, index, value))
        except GpFault as exc:
            raise MsrFault(index) from exc
        except GuestCrash as crash:
            raise GuestStop(EXIT_GUEST_FAULT, crash.report.describe()) from None
        except GuestResetRequest as reset:
            self.machine.request_reset(str(reset))

    def on_trap(self, vp: VirtualProcessor, port: int, size: int, is_out: bool) -> None:
        from vsmtrace.vmm.machine import EXIT_VMM_ERROR, GuestStop

        assert self.hv is not None
        hv, i, vtl = self.hv, vp.index, vp.vtl
        try:
            outcome = self.boundary.entry("hypercall", i, vtl, [i, vtl], lambda: hv.hypercall(i, vtl))
        except HypercallInternalError as exc:
            raise GuestStop(EXIT_VMM_ERROR, f"vsmtrace internal error in a hypercall handler: {exc}") from None
        if outcome.retry or outcome.exception is not None:
            # Re-execute the trapping OUT (rep continuation), or report the #UD/#GP at it
            # (a fault's RIP is the faulting instruction): rewind RIP if KVM stepped over it.
            regs = vp.vcpu.get_regs()
            if regs.rip & PAGE_OFFSET_MASK == HV_HYPERCALL_TRAP_INSN_LEN:
                regs.rip -= HV_HYPERCALL_TRAP_INSN_LEN
                vp.vcpu.set_regs(regs)
            vsm = self.machine.vsm
            if outcome.retry and vsm is not None:
                vsm.tlb_wait(vp)  # a TLB lock held by a higher VTL: wait for its VTL return
        # No blanket interrupt re-check here: everything a hypercall can make deliverable
        # (an IPI, a SynIC message, an EOI, a VTL switch) already sets interrupt_hint.
        action = outcome.vtl_action
        if action is not None and self.machine.vtl_action_hook is not None:
            self.machine.vtl_action_hook(vp, action)

    def on_test_device(self, value: int) -> None:
        """A command word written to QEMU's Hyper-V test device, run as a recorded emulation entry."""
        hv = self.hv
        vp = self.machine.current_vp()
        if hv is None or vp is None:
            return
        i, vtl = vp.index, vp.vtl
        self.boundary.entry("test_device", i, vtl, [value], lambda: hv.test_device_command(value))

    def on_interrupt_acknowledged(self, vp: VirtualProcessor, vector: int) -> None:
        hv = self.hv
        if hv is None:
            return
        i, vtl = vp.index, vp.vtl
        if self.boundary.entry("auto_eoi", i, vtl, [i, vtl, vector], lambda: hv.is_auto_eoi(i, vtl, vector)):
            vp.apic.eoi()

    def _on_eoi(self, vp: int, vtl: int, vector: int) -> None:
        hv = self.hv
        if hv is not None:
            self.boundary.entry("eoi", vp, vtl, [vp, vtl], lambda: hv.on_apic_eoi(vp, vtl))

    def shutdown(self) -> None:
        if self.hv is not None:
            self.hv.shutdown()
