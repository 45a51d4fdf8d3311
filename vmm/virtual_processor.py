"""One virtual processor: a KVM vCPU per VTL, a local APIC per VTL, its host thread and run loop.

Each VP runs in its own host thread. ``VirtualProcessor.run_loop`` enters KVM,
and the exit is dispatched through ``VirtualProcessor.exit_handlers`` — a table
from KVM exit reason to handler, so the whole of what the VMM does for a guest
reads in one place. Interrupts come only from the userspace local APICs and are
injected just before entry; kicks (a signal to the VP thread plus
``kvm_run.immediate_exit``) get a VP out of ``KVM_RUN`` when another thread
makes an interrupt pending or the machine stops. The partition-wide parts (RAM,
devices, MSR routing, stopping) are the :class:`vmm.machine.Machine`'s
(docs/architecture.md, "The exit path").
"""

from __future__ import annotations

import enum
import errno
import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vsmtrace.vmm.cpu_state import RegisterFile, apply_sipi
from vsmtrace.vmm.devices.apic import ApicGpFault, LocalApic
from vsmtrace.vmm.devices.bus import ALL_ONES
from vsmtrace.vmm.emulation_completions import try_complete
from vsmtrace.vmm.events import EventKind
from vsmtrace.vmm.guest_errors import describe_internal_error
from vsmtrace.vmm.kvm.exits import exit_name
from vsmtrace.vmm.kvm.system import KvmError, Vcpu, ffi, lib
from vsmtrace.vmm.stops import (
    EXIT_GUEST_FAULT,
    EXIT_OK,
    EXIT_VMM_ERROR,
    GuestStop,
    MsrFault,
)
from vsmtrace.vmm.vp import CpuMode, Segment, Table
from vsmtrace.vmm.vtl_array import VtlArray

if TYPE_CHECKING:
    from vsmtrace.vmm.machine import Machine

log = logging.getLogger("vsmtrace.machine")

APIC_MMIO_SIZE = 0x1000
APIC_TIMER_HZ = 1_000_000_000  # KVM's convention: one APIC bus cycle per ns

# kvm_run fields the run loop reads on every exit, unpacked in one call each (a cffi
# attribute read costs about as much as the struct unpack of all of them).
# exit_reason, ready_for_interrupt_injection, if_flag, flags, cr8, (apic_base skipped),
# then the io member of the exit union: direction, size, port, count, data_offset.
EXIT_INFO = struct.Struct("<IBBHQ8xBBHIQ")
EXIT_INFO_OFFSET = ffi.offsetof("struct kvm_run", "exit_reason")
IMMEDIATE_EXIT_OFFSET = ffi.offsetof("struct kvm_run", "immediate_exit")
RIP_OFFSET = ffi.offsetof("struct kvm_run", "s", "regs", "regs", "rip")
unpack_rip = struct.Struct("<Q").unpack_from
IO_OUT = int(lib.KVM_EXIT_IO_OUT)
PIO, MMIO = EventKind.PIO, EventKind.MMIO
MSR_IA32_APIC_BASE = 0x1B
RUN_NO_VCPU = int(lib.VSM_RUN_NO_VCPU)  # vsm_kvm_run_fast: an I/O server switched to a VTL without a fast path
RUN_RECORDED = int(lib.VSM_RUN_RECORDED)  # vsm_kvm_run_recorded: recorder status + this
assert ffi.offsetof("struct kvm_run", "cr8") == EXIT_INFO_OFFSET + 8, "kvm_run layout changed"
assert ffi.offsetof("struct kvm_run", "io") == EXIT_INFO_OFFSET + 24, "kvm_run layout changed"


class VpState(enum.Enum):
    WAIT_FOR_SIPI = "wait-for-sipi"
    RUNNING = "running"
    HALTED = "halted"
    STOPPED = "stopped"


class VirtualProcessor:
    """One VP: a KVM vCPU per VTL, a local APIC per VTL, and the host thread that runs it."""

    def __init__(self, machine: Machine, index: int) -> None:
        self.machine = machine
        self.index = index
        self.vcpus: VtlArray[Vcpu] = VtlArray(len(machine.vms), lambda vtl: machine.vms[vtl].create_vcpu(index))
        self.regfiles: VtlArray[RegisterFile] = VtlArray(len(self.vcpus), lambda vtl: RegisterFile(self.vcpus[vtl]))
        if machine.clock is None:
            machine.init_clock(self.vcpus[0])
        assert machine.clock is not None
        self.vtl = 0
        self.vcpu: Vcpu = self.vcpus[0]
        self.exit_info: tuple[int, ...] = ()  # the current exit's kvm_run fields (see EXIT_IO)
        self.exit_recorded = 0  # > 0: the current exit's PIO event was recorded in C (vsm_kvm_run_recorded)
        self.state = VpState.RUNNING if index == 0 else VpState.WAIT_FOR_SIPI
        self.cond = threading.Condition()
        self.wakeups = 0  # bumped by every notify; see wait()
        self.thread: threading.Thread | None = None
        self.thread_id = 0
        self.in_guest = False
        self.interrupt_hint = False  # set by APIC callbacks; cleared when nothing is deliverable
        self.last_cr8 = 0
        # vCPUs (one per VTL) handed a vector by KVM_INTERRUPT that may not have taken it yet
        # (see deliver_interrupts).
        self.injected: set[Vcpu] = set()
        self.sipi_vector: int | None = None
        self.start_vtl: int | None = None  # HvCallStartVirtualProcessor: start in this VTL, context already loaded
        self.started = index == 0
        self.requests: list[tuple[Callable[[], None], threading.Event]] = []  # run on this VP's thread
        self.pending_flush: set[int] = set()  # VTLs whose cached translations must go before the next entry
        self.exit_count = 0
        #: struct vsm_vp_run when the fast path may switch this VP's VTL in C (Machine.attach_fastpath).
        self.fast_run: Any = None
        self.apics: VtlArray[LocalApic] = VtlArray(
            len(machine.vms),
            lambda vtl: LocalApic(
                index,
                bsp=index == 0,
                clock=machine.clock,
                timers=machine.timers,
                bus=machine.routers[vtl],
                on_pending=self.kick,
                tsc_hz=machine.tsc_hz,
                timer_hz=APIC_TIMER_HZ,
                on_eoi=lambda vector: machine.apic_eoi(index, vtl, vector),
            ),
        )
        # KVM answers CPUID in the kernel (no exit), so the table each vCPU gets is what a
        # trace records as its CPUID events (see Machine.boot).
        self.cpuid_tables = VtlArray(len(self.vcpus), lambda vtl: machine.cpuid_for(index, vtl))
        for vcpu, table in zip(self.vcpus, self.cpuid_tables, strict=True):
            vcpu.set_cpuid(table)
        self.exit_handlers: dict[int, Callable[[], None]] = {
            lib.KVM_EXIT_IO: self.on_io,
            lib.KVM_EXIT_MMIO: self.on_mmio,
            lib.KVM_EXIT_HLT: self.on_hlt,
            lib.KVM_EXIT_IRQ_WINDOW_OPEN: self.on_nothing,
            lib.KVM_EXIT_INTR: self.on_nothing,
            lib.KVM_EXIT_X86_RDMSR: self.on_rdmsr,
            lib.KVM_EXIT_X86_WRMSR: self.on_wrmsr,
            lib.KVM_EXIT_SHUTDOWN: self.on_shutdown,
            lib.KVM_EXIT_INTERNAL_ERROR: self.on_internal_error,
            lib.KVM_EXIT_FAIL_ENTRY: self.on_fail_entry,
            lib.KVM_EXIT_SYSTEM_EVENT: self.on_system_event,
        }

    # -- the VTL currently running on this VP ---------------------------------------
    def set_vtl(self, vtl: int) -> None:
        """Make ``vtl`` the running VTL of this VP (``vcpu`` is a plain attribute: it is read per exit)."""
        self.vtl = vtl
        self.vcpu = self.vcpus[vtl]

    @property
    def apic(self) -> LocalApic:
        return self.apics[self.vtl]

    @property
    def active_vtl(self) -> int:
        return self.vtl

    def rip(self) -> int:
        vcpu = self.vcpu
        if vcpu.sync_regs:  # straight from the kvm_run copy (events read it on every exit)
            return unpack_rip(vcpu.run_view, RIP_OFFSET)[0]
        return int(vcpu.get_regs().rip)

    # -- VP interface (vmm.vp.VpAccess) ---------------------------------------------
    def get_register(self, vtl: int, name: str) -> int | Segment | Table:
        return self.regfiles[vtl].get(name)

    def set_register(self, vtl: int, name: str, value: int | Segment | Table) -> None:
        self.regfiles[vtl].set(name, value)

    def get_xmm(self, vtl: int, index: int) -> int:
        return self.regfiles[vtl].get_xmm(index)

    def set_xmm(self, vtl: int, index: int, value: int) -> None:
        self.regfiles[vtl].set_xmm(index, value)

    def cpl(self, vtl: int) -> int:
        return self.regfiles[vtl].mode_cpl()[1]

    def mode(self, vtl: int) -> CpuMode:
        return self.regfiles[vtl].mode_cpl()[0]

    def inject_exception(self, vtl: int, vector: int, error_code: int | None = None) -> None:
        events = self.vcpus[vtl].get_events()
        events.exception.injected = 1
        events.exception.nr = vector
        events.exception.has_error_code = 1 if error_code is not None else 0
        events.exception.error_code = error_code or 0
        self.vcpus[vtl].flush_regs()
        self.vcpus[vtl].set_events(events)
        sink = self.machine.sink
        if sink.enabled:
            rip = int(self.vcpus[vtl].get_regs().rip)
            sink.emit(EventKind.INTERRUPT, self.index, vtl, rip, vector=vector, source="exception")

    # -- KVM's copy of IA32_APIC_BASE ---------------------------------------------------
    def sync_kvm_apic_base(self, vtl: int, value: int) -> None:
        """Give KVM the guest's IA32_APIC_BASE after EN changed (call on this VP's thread).

        The userspace APIC owns the MSR, but KVM answers CPUID in the kernel and derives
        CPUID.01H:EDX.APIC from *its* copy of the MSR, and refuses KVM_SET_CPUID2 once the
        vCPU has run (docs/devices.md), so a host-initiated KVM_SET_MSRS is what clears the
        bit when the guest disables its APIC and sets it again on re-enable. If KVM refuses
        the value, the stale bit is reported once rather than failing the guest.
        """
        try:
            self.vcpus[vtl].set_msrs({MSR_IA32_APIC_BASE: value})
        except OSError as exc:
            self.machine.warn_once(
                ("apic-base-sync", self.index, vtl),
                f"KVM refused IA32_APIC_BASE={value:#x} on VP {self.index} ({exc}): CPUID.01H:EDX.APIC may be stale",
            )

    # -- kicks and waiting -------------------------------------------------------------
    def kick(self) -> None:
        """Make this VP look at its interrupts now (called from any thread)."""
        self.interrupt_hint = True
        with self.cond:
            self.wakeups += 1
            self.cond.notify_all()
        if self.in_guest:
            if self.fast_run is None:
                self.vcpu.run_struct.immediate_exit = 1
            else:  # the fast path may be running any of them (a VTL switch answered in C)
                for vcpu in self.vcpus:
                    vcpu.run_struct.immediate_exit = 1
            if self.thread_id:
                lib.vsm_kick_thread(self.thread_id)

    def wait(self, predicate: Callable[[], bool]) -> None:
        """Block until ``predicate()`` holds (or the machine stops).

        The predicate runs *without* the condition lock: it may take the emulation's lock
        (is a higher VTL's interrupt pending?), while a thread holding that lock may be
        kicking this VP. A wake-up counter read before the check closes the lost-wakeup race.
        """
        while True:
            if self.requests:
                self.service_requests()
            with self.cond:
                seen = self.wakeups
            if predicate() or self.machine.stopping:
                return
            with self.cond:
                if self.wakeups == seen and not self.requests:
                    self.cond.wait(0.5)

    # -- work other threads need done on this VP's thread (vCPU ioctls, TLB flushes) --------------
    def call_on_thread(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on this VP's thread before its next guest entry, and wait for it.

        A vCPU's ioctls would block while its thread is inside KVM_RUN, so cross-VP work
        (a TLB flush for another VP) is queued here instead. While waiting, the caller
        keeps serving its own queue, so two VPs flushing each other cannot deadlock.
        """
        if self.thread is None or self.state is VpState.STOPPED or threading.current_thread() is self.thread:
            fn()
            return
        done = threading.Event()
        with self.cond:
            self.requests.append((fn, done))
        self.kick()
        caller = self.machine.current_vp()
        while not done.wait(0.0005):
            if self.machine.stopping or self.state is VpState.STOPPED:
                return
            if caller is not None and caller.requests:
                caller.service_requests()

    def request_tlb_flush(self, vtl: int) -> None:
        """Make this VP drop cached translations of ``vtl`` before it next runs guest code.

        Returns once that is guaranteed: immediately if the VP is outside KVM_RUN (it
        flushes before re-entering), else after a kick has made it leave KVM_RUN. Never
        waits for a lock the target might hold, so flushes cannot deadlock.
        """
        with self.cond:
            self.pending_flush.add(vtl)
        if threading.current_thread() is self.thread or not self.in_guest:
            return
        seen = self.exit_count
        self.kick()
        deadline = time.monotonic() + 5.0
        while self.in_guest and self.exit_count == seen and not self.machine.stopping:
            if time.monotonic() > deadline:
                self.kick()
                deadline = time.monotonic() + 5.0
            time.sleep(0.00005)

    def flush_tlb(self) -> None:
        with self.cond:
            vtls, self.pending_flush = self.pending_flush, set()
        for vtl in vtls:
            self.flush_vtl_tlb(vtl)

    def flush_vtl_tlb(self, vtl: int) -> None:
        """Flush ``vtl``'s translations now, on this VP's thread."""
        vcpu = self.vcpus[vtl]
        vcpu.flush_regs()
        vcpu.set_sregs(vcpu.get_sregs())  # KVM resets the MMU context: no stale translation survives

    def service_requests(self) -> None:
        with self.cond:
            requests, self.requests = self.requests, []
        for fn, done in requests:
            try:
                fn()
            finally:
                done.set()

    # -- INIT / SIPI -------------------------------------------------------------------
    def on_init(self) -> None:
        if self.index == 0:
            return  # the BSP ignores INIT in this VMM (no reset support)
        with self.cond:
            self.state = VpState.WAIT_FOR_SIPI
            self.sipi_vector = None
            self.wakeups += 1
            self.cond.notify_all()

    def on_sipi(self, vector: int) -> None:
        with self.cond:
            if self.state is VpState.WAIT_FOR_SIPI:
                self.sipi_vector = vector
                self.wakeups += 1
                self.cond.notify_all()

    def start_in_vtl(self, vtl: int) -> None:
        """Start a VP that waits for SIPI directly in ``vtl`` (its context was loaded already)."""
        with self.cond:
            if self.state is VpState.WAIT_FOR_SIPI:
                self.start_vtl = vtl
                self.started = True
                self.wakeups += 1
                self.cond.notify_all()

    # -- the run loop ----------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self.thread_main, name=f"vp{self.index}", daemon=True)
        self.thread.start()

    def thread_main(self) -> None:
        self.thread_id = lib.vsm_thread_self()
        machine = self.machine
        try:
            self.run_loop()
        except GuestStop as stop:
            machine.request_stop(stop.status, str(stop), vp=self)
        except Exception as exc:  # a VMM bug: stop the guest cleanly, with a message
            log.exception("VP %d: internal error", self.index)
            machine.emit(EventKind.ERROR, self, message=f"{type(exc).__name__}: {exc}")
            machine.request_stop(EXIT_VMM_ERROR, f"vsmtrace internal error on VP {self.index}: {exc}", vp=self)
        finally:
            self.state = VpState.STOPPED
            machine.emit(EventKind.VP_STOP, self)

    def run_loop(self) -> None:
        machine = self.machine
        if self.state is VpState.WAIT_FOR_SIPI:
            self.wait_for_sipi()
        machine.emit(EventKind.VP_START, self)
        vcpu = self.vcpu
        run = vcpu.run_struct
        handlers = self.exit_handlers
        waiting = VpState.WAIT_FOR_SIPI
        kvm_run = lib.vsm_kvm_run
        kvm_run_recorded = lib.vsm_kvm_run_recorded
        kvm_run_fast = lib.vsm_kvm_run_fast
        unpack_exit = EXIT_INFO.unpack_from
        deterministic = machine.deterministic  # fixed once the machine is built
        while not machine.stopping:
            if self.state is waiting:
                self.wait_for_sipi()
                vcpu = self.vcpu
                run = vcpu.run_struct
                continue
            kicks = self.wakeups
            if self.requests:
                self.service_requests()
            if self.pending_flush:
                self.flush_tlb()
            if self.interrupt_hint:
                run = self.deliver_interrupts(run)
                vcpu = self.vcpu
            self.in_guest = True
            if self.wakeups != kicks:
                # kick() came after the checks above but saw in_guest still False, so it set no
                # immediate_exit: look again rather than enter a guest that may not exit soon.
                self.in_guest = False
                continue
            if machine.stopping:
                break
            vcpu._sregs = None  # KVM may change them while the guest runs
            recorder = vcpu.exit_recorder
            if vcpu.fastpath is not None:  # records port I/O too when the machine records (its ``rec``)
                r = kvm_run_fast(vcpu.fastpath)
            elif recorder is not None:
                r = kvm_run_recorded(vcpu.fd, recorder)
            else:
                r = kvm_run(vcpu.fd)
            vcpu.sregs_exported = vcpu.sync_sregs  # what KVM exported with the exit is current (Vcpu.exited)
            self.in_guest = False
            self.exit_count += 1
            if self.fast_run is None:
                if vcpu.run_view[IMMEDIATE_EXIT_OFFSET]:
                    run.immediate_exit = 0
            else:
                if self.fast_run.current != self.vtl:
                    self.adopt_fast_switch()
                    vcpu = self.vcpu
                    run = vcpu.run_struct
                for other in self.vcpus:  # kick() marks every vCPU of the VP (the fast path may have switched)
                    if other.run_view[IMMEDIATE_EXIT_OFFSET]:
                        other.run_struct.immediate_exit = 0
            view = vcpu.run_view
            self.exit_recorded = r
            if r:
                if r < 0:
                    if r in (-errno.EINTR, -errno.EAGAIN):
                        continue
                    if r == RUN_NO_VCPU:
                        raise GuestStop(EXIT_VMM_ERROR, "vsmtrace internal error: the fast path switched to a VTL with no vCPU")
                    raise GuestStop(EXIT_VMM_ERROR, f"KVM_RUN failed: {errno.errorcode.get(-r, -r)}")
                if r > RUN_RECORDED:  # recorded in C, and the recorder wants a flush
                    machine.sink.flush_due(r - RUN_RECORDED)
            info = self.exit_info = unpack_exit(view, EXIT_INFO_OFFSET)
            reason = info[0]
            cr8 = info[4]
            if cr8 != self.last_cr8:  # the guest wrote CR8 (= TPR[7:4]) in long mode
                self.last_cr8 = cr8
                self.apic.set_tpr_from_cr8(cr8)
                self.interrupt_hint = True
            if deterministic is not None:
                deterministic.at_exit(self, reason)
            handler = handlers.get(reason)
            if handler is None:
                self.on_unhandled()
            else:
                handler()
            vcpu = self.vcpu  # a handler may have switched the VP to another VTL
            run = vcpu.run_struct

    def adopt_fast_switch(self) -> None:
        """The fast path answered VTL calls/returns in C and stopped on another VTL's vCPU: make it the
        running one, as the Python switch would have left it (docs/architecture.md, "Exit paths in C")."""
        self.set_vtl(int(self.fast_run.current))
        self.vcpu.exited()
        self.last_cr8 = int(self.fast_run.cr8)
        self.interrupt_hint = True

    def wait_for_sipi(self) -> None:
        self.wait(lambda: self.sipi_vector is not None or self.start_vtl is not None)
        if self.machine.stopping:
            return
        if self.start_vtl is not None:
            self.set_vtl(self.start_vtl)
            self.start_vtl = None
        else:
            vector = self.sipi_vector
            assert vector is not None
            self.sipi_vector = None
            apply_sipi(self.vcpu, vector)
        self.started = True
        self.last_cr8 = self.vcpu.run_struct.cr8
        self.interrupt_hint = True
        self.state = VpState.RUNNING

    def deliver_interrupts(self, run: Any) -> Any:
        """Inject the highest deliverable APIC vector, or ask KVM for an interrupt window.

        Returns the kvm_run of the VTL that will run (a higher VTL's pending interrupt
        may switch the VP first).

        The hint is cleared *before* anything is looked at: an APIC accepts a vector before
        its owner is kicked, so a kick that lands while this runs either is seen here or
        leaves the hint set for the next pass. (Clearing it after finding nothing pending
        lost such a kick: the IPI then waited for an unrelated exit, seconds under load.)
        """
        self.interrupt_hint = False
        hook = self.machine.pre_entry_hook
        if hook is not None:
            hook(self)
            run = self.vcpu.run_struct
        apic = self.apic
        vector = apic.pending_vector()
        if vector is None:
            run.request_interrupt_window = 0
            return run
        self.interrupt_hint = True  # look again at the next entry (window exit, or more pending)
        if self.vcpu in self.injected:
            # KVM_INTERRUPT only queues the vector for the next entry; if KVM_RUN returned
            # before entering (a kick from the timer thread), it is still queued, and a second
            # KVM_INTERRUPT would replace it: the first vector, already acknowledged (in ISR),
            # would be lost for good. Seen on this host in a recorded Linux boot: the serial
            # vector injected, a timer kick, then the stimer vector injected at the same RIP;
            # the serial interrupt never reached the guest and its console stopped.
            if self.vcpu.get_events().interrupt.injected:
                run.request_interrupt_window = 1
                return run
            self.injected.discard(self.vcpu)
        if run.ready_for_interrupt_injection and run.if_flag:
            vector = apic.acknowledge()
            self.vcpu.interrupt(vector)
            self.injected.add(self.vcpu)
            if self.machine.on_interrupt_acknowledged is not None:
                self.machine.on_interrupt_acknowledged(self, vector)
            self.machine.emit(EventKind.INTERRUPT, self, vector=vector, source="apic")
            run.request_interrupt_window = 1 if apic.pending_vector() is not None else 0
        else:
            run.request_interrupt_window = 1
        return run

    # -- exit handlers ------------------------------------------------------------------------
    def on_nothing(self) -> None:
        return None

    def on_io(self) -> None:
        view = self.vcpu.run_view
        _, _, _, _, _, direction, size, port, count, offset = self.exit_info
        machine = self.machine
        trap = machine.trap_ports.get(port)
        if trap is not None and direction == IO_OUT:  # an IN from a trap port is an ordinary unclaimed read
            trap(self, port, size, True)
            return
        bus = machine.pio
        recording = machine.sink.enabled and self.exit_recorded <= 0  # not already recorded by vsm_kvm_run_recorded
        if direction == IO_OUT:
            device = bus.devices.get(port)  # the bus, inlined: this is the hottest path of all
            if count == 1 and device is not None:
                value = int.from_bytes(view[offset : offset + size], "little")
                if recording:  # rare: KVM_RUN records these in C when it can (attach_exit_recorders)
                    self.record_io(PIO, port, size, True, value)
                device.pio_write(port, size, value)
                return
            for i in range(count):
                start = offset + i * size
                value = int.from_bytes(view[start : start + size], "little")
                if recording:
                    self.record_io(PIO, port, size, True, value)
                if device is None:
                    bus.write(port, size, value)  # unclaimed: warns once
                else:
                    device.pio_write(port, size, value)
        else:
            for i in range(count):
                value = bus.read(port, size)
                start = offset + i * size
                view[start : start + size] = value.to_bytes(size, "little")
                if recording:
                    self.record_io(PIO, port, size, False, value)

    def record_io(self, kind: EventKind, address: int, size: int, is_write: bool, data: int) -> None:
        """A PIO or MMIO event for the running VTL, through the sink's positional fast path."""
        sink = self.machine.sink
        if sink.enabled:
            status = sink.record_io(kind, self.index, self.vtl, self.rip(), address, size, is_write, data)
            if status > 0:
                sink.flush_due(status)

    def on_mmio(self) -> None:
        run = self.vcpu.run_struct
        mmio = run.mmio
        gpa, length, is_write = mmio.phys_addr, mmio.len, bool(mmio.is_write)
        machine = self.machine
        hook = machine.mmio_hook
        if hook is not None and hook(self, gpa, length, is_write):
            return  # VSM protections completed or intercepted it
        apic = self.apic
        if apic.mmio_decoded and apic.mmio_base <= gpa < apic.mmio_base + APIC_MMIO_SIZE:
            offset = gpa - apic.mmio_base
            self.interrupt_hint = True  # EOI, TPR or SVR may have changed what is deliverable
            if is_write:
                value = int.from_bytes(bytes(mmio.data[0:length]), "little")
                apic.mmio_write(offset, length, value)
                run.cr8 = self.last_cr8 = apic.cr8
            else:
                value = apic.mmio_read(offset, length)
                ffi.memmove(mmio.data, value.to_bytes(length, "little"), length)
            self.record_io(MMIO, gpa, length, is_write, value)
            return
        found = machine.mmio.find(gpa)
        if found is not None:
            base, dev = found
            if is_write:
                value = int.from_bytes(bytes(mmio.data[0:length]), "little")
                dev.mmio_write(gpa - base, length, value)
            else:
                value = dev.mmio_read(gpa - base, length)
                ffi.memmove(mmio.data, value.to_bytes(length, "little"), length)
        else:
            value = int.from_bytes(bytes(mmio.data[0:length]), "little") if is_write else ALL_ONES.get(length, 0)
            if not is_write:
                ffi.memmove(mmio.data, value.to_bytes(length, "little"), length)
            machine.warn_once(("mmio", gpa & ~0xFFF), f"guest accessed unbacked guest-physical address {gpa:#x}")
        self.record_io(MMIO, gpa, length, is_write, value)

    def on_hlt(self) -> None:
        run = self.vcpu.run_struct
        machine = self.machine
        machine.emit(EventKind.EXIT, self, exit_reason="HLT", exit_code=int(lib.KVM_EXIT_HLT))
        interruptible = bool(run.if_flag)
        if machine.deterministic is not None:
            machine.deterministic.halt(self, interruptible)
            self.interrupt_hint = True
            return
        self.state = VpState.HALTED
        machine.note_halt(self, interruptible)
        try:
            self.wait(lambda: self.can_wake(interruptible))
        finally:
            self.state = VpState.RUNNING
            machine.note_wake(self)
        self.interrupt_hint = True

    def can_wake(self, interruptible: bool) -> bool:
        if self.state is VpState.WAIT_FOR_SIPI or self.sipi_vector is not None:
            return True
        wake = self.machine.wake_hook
        if wake is not None and wake(self):
            return True
        return interruptible and self.apic.pending_vector() is not None

    def on_rdmsr(self) -> None:
        msr = self.vcpu.run_struct.msr
        index = msr.index
        try:
            value = self.machine.msr_read(self, index)
            msr.data = value
            msr.error = 0
            fault = False
        except (ApicGpFault, MsrFault):
            value = 0
            msr.error = 1
            fault = True
        if not self.machine.msr_records_itself(index):
            self.machine.emit(EventKind.MSR, self, msr=index, value=value, is_write=False, fault=fault)

    def on_wrmsr(self) -> None:
        msr = self.vcpu.run_struct.msr
        index, value = msr.index, msr.data
        try:
            self.machine.msr_write(self, index, value)
            msr.error = 0
            fault = False
        except (ApicGpFault, MsrFault):
            msr.error = 1
            fault = True
        if not self.machine.msr_records_itself(index):
            self.machine.emit(EventKind.MSR, self, msr=index, value=value, is_write=True, fault=fault)

    def on_shutdown(self) -> None:
        self.machine.emit(EventKind.EXIT, self, exit_reason="SHUTDOWN", exit_code=int(lib.KVM_EXIT_SHUTDOWN))
        self.machine.request_reset(f"guest triple-faulted on VP {self.index} at rip={self.rip():#x}", fault=True)

    def on_internal_error(self) -> None:
        run = self.vcpu.run_struct
        hook = self.machine.internal_error_hook
        if hook is not None and hook(self):
            return  # e.g. VSM: an execute intercept on a no-execute page
        suberror = int(run.internal.suberror)
        self.machine.emit(
            EventKind.EXIT, self, exit_reason="INTERNAL_ERROR", exit_code=int(lib.KVM_EXIT_INTERNAL_ERROR),
            suberror=suberror,
        )  # fmt: skip
        if try_complete(self, suberror) is not None:
            return  # an instruction KVM lacks, finished here (int3, fwait)
        data = [int(run.internal.data[i]) for i in range(min(run.internal.ndata, 16))]
        message = describe_internal_error(self, int(run.internal.suberror), data)
        raise GuestStop(EXIT_GUEST_FAULT, message)

    def on_fail_entry(self) -> None:
        reason = self.vcpu.run_struct.fail_entry.hardware_entry_failure_reason
        raise GuestStop(EXIT_GUEST_FAULT, f"KVM could not enter the guest on VP {self.index} (reason {reason:#x})")

    def on_system_event(self) -> None:
        kind = self.vcpu.run_struct.system_event.type
        if kind == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
            raise GuestStop(EXIT_OK, "guest shut down")
        if kind == lib.KVM_SYSTEM_EVENT_RESET:
            self.machine.request_reset("KVM system reset event")
            return
        raise GuestStop(EXIT_GUEST_FAULT, f"unexpected KVM system event {kind}")

    def on_unhandled(self) -> None:
        reason = self.vcpu.run_struct.exit_reason
        raise GuestStop(EXIT_VMM_ERROR, f"unhandled KVM exit {exit_name(reason)} on VP {self.index}")

    # -- one exit at a time, driven from outside (re-execution) -------------------------------------
    def enter_once(self, irq_window: bool) -> int:
        """Run the active vCPU until its next exit (no handling, no interrupts injected); returns the exit reason.

        ``irq_window`` asks KVM to exit as soon as the guest can take an interrupt, as the
        recorded entry did. Raises OSError if KVM_RUN fails (a signal just retries).
        """
        vcpu = self.vcpu
        run = vcpu.run_struct
        run.request_interrupt_window = 1 if irq_window else 0
        while True:
            r = vcpu.run()  # KvmError (an OSError) for anything but a signal or EAGAIN
            if r >= 0:
                return int(run.exit_reason)
            if r != -errno.EINTR:
                raise KvmError("KVM_RUN", -r)

    def pio_exit(self) -> PioExit:
        """The port I/O of the current exit (KVM_EXIT_IO)."""
        io = self.vcpu.run_struct.io
        return PioExit(int(io.port), int(io.size), io.direction == IO_OUT, int(io.count))

    def _pio_data(self, index: int) -> Any:
        run = self.vcpu.run_struct
        return ffi.cast("uint8_t *", run) + run.io.data_offset + index * run.io.size

    def pio_value(self, index: int) -> int:
        """The value the guest wrote in element ``index`` of the current OUT."""
        return int.from_bytes(ffi.buffer(self._pio_data(index), self.vcpu.run_struct.io.size), "little")

    def complete_pio_in(self, index: int, value: int) -> None:
        """Give element ``index`` of the current IN ``value``."""
        size = self.vcpu.run_struct.io.size
        ffi.memmove(self._pio_data(index), value.to_bytes(size, "little"), size)

    def mmio_exit(self) -> MmioExit:
        """The MMIO access of the current exit (KVM_EXIT_MMIO); ``data`` is what a write writes."""
        mmio = self.vcpu.run_struct.mmio
        return MmioExit(int(mmio.phys_addr), int(mmio.len), bool(mmio.is_write), bytes(mmio.data[0 : mmio.len]))

    def complete_mmio_read(self, value: int) -> None:
        mmio = self.vcpu.run_struct.mmio
        ffi.memmove(mmio.data, value.to_bytes(mmio.len, "little"), mmio.len)

    def msr_exit(self) -> MsrExit:
        """The MSR access of the current exit (KVM_EXIT_X86_RDMSR / WRMSR); ``value`` is what a write writes."""
        msr = self.vcpu.run_struct.msr
        return MsrExit(int(msr.index), int(msr.data))

    def complete_msr(self, value: int | None, fault: bool) -> None:
        """Finish the current MSR exit: a read returns ``value`` (unless None), ``fault`` raises #GP."""
        msr = self.vcpu.run_struct.msr
        if value is not None:
            msr.data = value
        msr.error = 1 if fault else 0


@dataclass(frozen=True)
class PioExit:
    port: int
    size: int
    is_write: bool
    count: int


@dataclass(frozen=True)
class MmioExit:
    gpa: int
    size: int
    is_write: bool
    data: bytes


@dataclass(frozen=True)
class MsrExit:
    index: int
    value: int
