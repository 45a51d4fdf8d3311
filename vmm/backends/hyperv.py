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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vsmtrace.vmm.devices.hyperv_testdev import HYPERV_TESTDEV_PORT, HYPERV_TESTDEV_PORT_COUNT, HypervTestdev
from vsmtrace.vmm.emulation import EmulationPorts, build_emulation
from vsmtrace.vmm.emulation_io import Boundary, recorded_ports
from vsmtrace.vmm.extension import CpuidEntry, MachineExtension, TrapHandler
from vsmtrace.vmm.guest_walk import read_linear, translator
from vsmtrace.vmm.hyperv import HyperV
from vsmtrace.vmm.hyperv.cpuid import HypervPolicy, hyperv_cpuid_leaves
from vsmtrace.vmm.hyperv.errors import GpFault, GuestCrash, GuestResetRequest
from vsmtrace.vmm.hyperv.hvdef import (
    HV_X64_MSR_RANGE_FIRST,
    HV_X64_MSR_RANGE_LAST,
    HvMsr,
)
from vsmtrace.vmm.hyperv.hypercall import HypercallInternalError
from vsmtrace.vmm.hyperv.hypercall_page import HV_HYPERCALL_TRAP_INSN_LEN, HV_HYPERCALL_TRAP_PORT
from vsmtrace.vmm.hyperv.reference_time import ReferenceClock, guest_tsc_params
from vsmtrace.vmm.protocol import Entry
from vsmtrace.vmm.stops import EXIT_GUEST_FAULT, EXIT_VMM_ERROR, GuestStop, MsrFault
from vsmtrace.vmm.timers import TimerHandle, TimerScheduler

if TYPE_CHECKING:
    from vsmtrace.vmm.backends.hypercall_fastpath import HypercallFastPath
    from vsmtrace.vmm.backends.vsm import VsmBackend
    from vsmtrace.vmm.machine import Machine
    from vsmtrace.vmm.virtual_processor import VirtualProcessor

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


_OUT_IMM8 = (0xE6, 0xE7)  # out imm8, al / out imm8, eAX (x86 encodings)
_OUT_DX = (0xEE, 0xEF)  # out dx, al / out dx, eAX
_OPSIZE_PREFIX = 0x66


def trap_out_length(before: bytes, size: int) -> int:
    """Length of the OUT to the trap port that ends right where ``before`` ends, 0 if there is none.

    ``before`` holds the (up to 3) bytes in front of RIP. The imm8 form (``E6/E7 58``) and the DX
    form (``EE/EF``) both trap; a 16-bit OUT carries an operand-size prefix. Traps are not only
    the hypercall page's ``out 0x58, al``: a guest may trap from anywhere, in any width.
    """
    prefix = 1 if size == 2 else 0
    if len(before) >= 2 and before[-2] in _OUT_IMM8 and before[-1] == HV_HYPERCALL_TRAP_PORT:
        length = HV_HYPERCALL_TRAP_INSN_LEN
    elif before and before[-1] in _OUT_DX:
        length = 1
    else:
        return 0
    if prefix and not (len(before) > length and before[-length - 1] == _OPSIZE_PREFIX):
        return 0
    return length + prefix


def rewind_trap(vp: VirtualProcessor) -> None:
    """Put RIP back on the trapping OUT of the current I/O exit if KVM already stepped over it.

    A fault's RIP is the faulting instruction and a rep continuation re-executes it, so a
    retry or a #UD/#GP needs RIP on the OUT, wherever the guest trapped from and in whatever
    width. Re-execution replays a recorded retry or fault with this too.
    """
    vcpu = vp.vcpu
    regs = vcpu.get_regs()
    end = int(vcpu.get_sregs().cs.base) + int(regs.rip)
    translate = translator(vcpu)
    before = read_linear(vp.machine.memory, translate, end - 3, 3)
    if len(before) < 3:  # the page before may be unmapped: what is in RIP's own page decides
        within = min(3, end & PAGE_OFFSET_MASK)
        before = read_linear(vp.machine.memory, translate, end - within, within)
    length = trap_out_length(before, vp.pio_exit().size)
    if length:
        regs.rip -= length
        vcpu.set_regs(regs)


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


class HypervBackend(MachineExtension):
    """Hyper-V for a machine: CPUID leaves, the synthetic MSRs and the hypercall trap port; the
    :class:`HyperV` itself (and VSM's logic, through ``vsm``) is built once the VPs exist."""

    #: The emulation emits its own MSR events (with fault reasons); the machine does not repeat them.
    records_events = True

    def __init__(self, policy: HypervPolicy, vsm: VsmBackend | None = None) -> None:
        self.policy = policy.normalized()
        self.vsm = vsm
        self.hv: HyperV | None = None
        self.lock = threading.Lock()
        self.fastpath: HypercallFastPath | None = None  # built by fast_io_server

    def attach(self, machine: Machine) -> None:
        self.machine = machine

    def cpuid_entries(self) -> list[CpuidEntry]:
        leaves = hyperv_cpuid_leaves(self.policy, self.machine.config.smp)
        return [(leaf, subleaf, 0, a, b, c, d) for leaf, subleaf, a, b, c, d in leaves]

    def hypervisor_present(self) -> bool:
        return True

    def msr_ranges(self) -> list[tuple[int, int, Any]]:
        return [(HV_X64_MSR_RANGE_FIRST, HV_X64_MSR_RANGE_LAST, self)]

    def trap_ports(self) -> dict[int, TrapHandler]:
        return {HV_HYPERCALL_TRAP_PORT: self.on_trap}

    def pio_devices(self) -> list[tuple[int, int, Any]]:
        return [(HYPERV_TESTDEV_PORT, HYPERV_TESTDEV_PORT_COUNT, HypervTestdev(self.on_test_device))]

    def fast_msr_values(self, vp_index: int, vtl: int) -> dict[int, int | None]:
        return {} if self.hv is None else self.hv.fast_msr_values(vp_index, vtl)  # docs/hyperv.md

    def fast_io_server(self, vp_index: int, vtl: int) -> tuple[int, int] | None:
        """The hypercall fast path (vmm/backends/hypercall_fastpath.py), built on first use. A recording
        machine gets it only with VSM: while recording it answers nothing but VTL switches, which it
        records (docs/architecture.md, "Exit paths in C")."""
        m = self.machine
        if self.hv is None or m.views is None or not self.policy.hypercalls:
            return None
        recording = bool(m.sink.enabled)
        if recording and self.vsm is None:
            return None
        if self.fastpath is None:
            from vsmtrace.vmm.backends.hypercall_fastpath import HypercallFastPath

            self.fastpath = HypercallFastPath(self.hv, m.memory, list(m.views), recording=recording)
        server = self.fastpath.caller(vp_index, vtl)
        if self.vsm is not None and vtl == len(m.vps[vp_index].vcpus) - 1:  # the VP's last vCPU: link them
            fp = self.fastpath
            self.vsm.attach_fast_switch(vp_index, fp.vtl_switch(vp_index), fp.ffi, fp.guards)
        return server

    def reference_time(self) -> int:
        return self.reference.reference_time()

    def vps_created(self) -> None:
        self._create()

    def stopped(self) -> None:
        self.shutdown()

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
        # Everything the emulation reads or writes goes through the recorded boundary
        # (a pass-through when nothing records), so a trace can be replayed without KVM.
        self.boundary = boundary = Boundary(m.sink, threading.RLock())
        ports = EmulationPorts(
            partition=m,
            timers=ReferenceTimers(m.timers, self.reference.reference_time_ns, m.clock.now_ns),
            apic=MachineApics(m),
            tlb=m,
            tsc_page=self.reference.tsc_page_params,
            sink=m.sink,
            vsm=self.vsm,
        )
        if boundary.recording:
            ports = recorded_ports(ports, boundary)
        self.partition = ports.partition
        self.sink = ports.sink
        emulation = build_emulation(
            self.policy, ports, vtl_count=len(m.vms), tsc_hz=m.tsc_hz, apic_hz=m.apic_timer_hz,
            ram_ranges=[(r.gpa, r.size) for r in m.memory.ranges],
        )  # fmt: skip
        self.hv = emulation.hv
        if self.vsm is not None:
            self.vsm.take_emulation(emulation, boundary)
        boundary.lock = self.hv.lock

    # -- machine hooks -----------------------------------------------------------------------
    def msr_read(self, vp: VirtualProcessor, index: int) -> int:
        assert self.hv is not None
        hv, i, vtl = self.hv, vp.index, vp.vtl
        try:
            return int(self.boundary.entry(Entry.MSR_READ, i, vtl, [i, vtl, index], lambda: hv.msr_read(i, vtl, index)))
        except GpFault as exc:
            raise MsrFault(index) from exc

    def msr_write(self, vp: VirtualProcessor, index: int, value: int) -> None:
        assert self.hv is not None
        hv, i, vtl = self.hv, vp.index, vp.vtl
        try:
            self.boundary.entry(Entry.MSR_WRITE, i, vtl, [i, vtl, index, value], lambda: hv.msr_write(i, vtl, index, value))
        except GpFault as exc:
            raise MsrFault(index) from exc
        except GuestCrash as crash:
            raise GuestStop(EXIT_GUEST_FAULT, crash.report.describe()) from None
        except GuestResetRequest as reset:
            self.machine.request_reset(str(reset))
        if index == HvMsr.HV_X64_MSR_HYPERCALL and self.fastpath is not None:
            self.fastpath.refresh_pages()
        elif index == HvMsr.HV_X64_MSR_VP_ASSIST_PAGE and self.vsm is not None:
            self.vsm.invalidate_fast_switch()  # the VTL call writes the new VTL control area

    def on_trap(self, vp: VirtualProcessor, port: int, size: int, is_out: bool) -> None:
        assert self.hv is not None
        hv, i, vtl = self.hv, vp.index, vp.vtl
        boundary = self.boundary
        try:
            if boundary.recording:
                outcome = boundary.entry(Entry.HYPERCALL, i, vtl, [i, vtl], lambda: hv.hypercall(i, vtl))
            else:  # what the boundary does when nothing records, without building the closure
                outcome = hv.hypercall(i, vtl)
        except HypercallInternalError as exc:
            raise GuestStop(EXIT_VMM_ERROR, f"vsmtrace internal error in a hypercall handler: {exc}") from None
        if outcome.retry or outcome.exception is not None:
            # Re-execute the trapping OUT (rep continuation), or report the #UD/#GP at it
            # (a fault's RIP is the faulting instruction).
            rewind_trap(vp)
            if outcome.retry and self.vsm is not None:
                self.vsm.tlb_wait(vp)  # a TLB lock held by a higher VTL: wait for its VTL return
        # No blanket interrupt re-check here: everything a hypercall can make deliverable
        # (an IPI, a SynIC message, an EOI, a VTL switch) already sets interrupt_hint.

    def on_test_device(self, value: int) -> None:
        """A command word written to QEMU's Hyper-V test device, run as a recorded emulation entry."""
        hv = self.hv
        vp = self.machine.current_vp()
        if hv is None or vp is None:
            return
        i, vtl = vp.index, vp.vtl
        self.boundary.entry(Entry.TEST_DEVICE, i, vtl, [value], lambda: hv.test_device_command(value))

    def interrupt_acknowledged(self, vp: VirtualProcessor, vector: int) -> None:
        hv = self.hv
        if hv is None:
            return
        i, vtl = vp.index, vp.vtl
        if self.boundary.entry(Entry.AUTO_EOI, i, vtl, [i, vtl, vector], lambda: hv.is_auto_eoi(i, vtl, vector)):
            vp.apic.eoi()

    def apic_eoi(self, vp_index: int, vtl: int, vector: int) -> None:
        hv = self.hv
        if hv is not None:
            self.boundary.entry(Entry.EOI, vp_index, vtl, [vp_index, vtl], lambda: hv.on_apic_eoi(vp_index, vtl))

    def shutdown(self) -> None:
        if self.hv is not None:
            self.hv.shutdown()
