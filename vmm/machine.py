"""The partition: KVM VMs (one per VTL), VPs with their threads, devices, and the run loop.

Each VP runs in its own host thread. ``VirtualProcessor.run_loop`` enters KVM,
and the exit is dispatched through ``VirtualProcessor.exit_handlers`` — a table
from KVM exit reason to handler, so the whole of what the VMM does for a guest
reads in one place. Interrupts come only from the userspace local APICs and are
injected just before entry; kicks (a signal to the VP thread plus
``kvm_run.immediate_exit``) get a VP out of ``KVM_RUN`` when another thread
makes an interrupt pending or the machine stops.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from vsmtrace.vmm.config import MachineConfig
from vsmtrace.vmm.cpu_state import RegisterFile, apply_boot_state, apply_sipi, cpu_mode
from vsmtrace.vmm.cpuid import CpuidPolicy, build_cpuid
from vsmtrace.vmm.cpuid_probe import ineffective_hiding
from vsmtrace.vmm.deterministic import DeterministicTime
from vsmtrace.vmm.devices.apic import ApicGpFault, ApicRouter, LocalApic
from vsmtrace.vmm.devices.bus import ALL_ONES, MmioBus, PioBus
from vsmtrace.vmm.devices.cmos_rtc import RTC_INDEX_PORT, RTC_PORT_COUNT, CmosRtc
from vsmtrace.vmm.devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from vsmtrace.vmm.devices.fw_cfg import FW_CFG_PORT_COUNT, FW_CFG_SELECTOR_PORT, FwCfg
from vsmtrace.vmm.devices.ioapic import IOAPIC_BASE, IOAPIC_MMIO_SIZE, IoApic
from vsmtrace.vmm.devices.legacy import PIC_MASTER, PIC_PORTS, PIC_SLAVE, POST_PORT, Ignore, Pic8259Stub
from vsmtrace.vmm.devices.pc_testdev import IOMEM_BASE, IOMEM_SIZE, PcTestdev
from vsmtrace.vmm.devices.serial import COM1_BASE, COM1_IRQ, PORT_COUNT, Uart16550
from vsmtrace.vmm.emulation_completions import try_complete
from vsmtrace.vmm.events import EventKind, EventSink, NullSink
from vsmtrace.vmm.firmware.acpi import IoApicInfo, build_acpi_tables
from vsmtrace.vmm.guest_errors import describe_internal_error
from vsmtrace.vmm.kvm.exits import exit_name
from vsmtrace.vmm.kvm.system import Kvm, KvmUnavailable, Vcpu, Vm, ffi, lib
from vsmtrace.vmm.loader.kernel import Module, load_kernel
from vsmtrace.vmm.memory import GuestMemory
from vsmtrace.vmm.timers import ManualClock, TimerService
from vsmtrace.vmm.vp import Access, CpuMode, Segment, Table, VtlAccessDenied

from vsmtrace import __version__

log = logging.getLogger("vsmtrace.machine")

APIC_MMIO_BASE = 0xFEE00000
APIC_MMIO_SIZE = 0x1000
APIC_TIMER_HZ = 1_000_000_000  # KVM's convention: one APIC bus cycle per ns
MSR_IA32_APIC_BASE = 0x1B
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_X2APIC_FIRST = 0x800
MSR_X2APIC_LAST = 0x8FF
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000
FW_CFG_VERSION_FILE = "etc/vsmtrace/version"
MSR_EXIT_REASONS = ("KVM_MSR_EXIT_REASON_INVAL", "KVM_MSR_EXIT_REASON_UNKNOWN", "KVM_MSR_EXIT_REASON_FILTER")

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
RUN_RECORDED = int(lib.VSM_RUN_RECORDED)  # vsm_kvm_run_recorded: recorder status + this
PORTS = 1 << 16
assert ffi.offsetof("struct kvm_run", "cr8") == EXIT_INFO_OFFSET + 8, "kvm_run layout changed"
assert ffi.offsetof("struct kvm_run", "io") == EXIT_INFO_OFFSET + 24, "kvm_run layout changed"

STDIN_FD = 0
SERIAL_INPUT_CHUNK = 4096

# vsmtrace's own exit statuses (the guest's isa-debug-exit statuses are always odd).
EXIT_OK = 0
EXIT_GUEST_FAULT = 4  # triple fault, emulation failure, crash MSRs, all VPs halted for good
EXIT_VMM_ERROR = 6  # a bug in vsmtrace while serving the guest
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130


class VpState(enum.Enum):
    WAIT_FOR_SIPI = "wait-for-sipi"
    RUNNING = "running"
    HALTED = "halted"
    STOPPED = "stopped"


class GuestStop(Exception):
    """Raised inside a VP thread to end the run with a status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class VirtualProcessor:
    """One VP: a KVM vCPU per VTL, a local APIC per VTL, and the host thread that runs it."""

    def __init__(self, machine: Machine, index: int) -> None:
        self.machine = machine
        self.index = index
        self.vcpus: list[Vcpu] = [vm.create_vcpu(index) for vm in machine.vms]
        self.regfiles = [RegisterFile(v) for v in self.vcpus]
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
        self.sipi_vector: int | None = None
        self.start_vtl: int | None = None  # HvCallStartVirtualProcessor: start in this VTL, context already loaded
        self.started = index == 0
        self.requests: list[tuple[Callable[[], None], threading.Event]] = []  # run on this VP's thread
        self.pending_flush: set[int] = set()  # VTLs whose cached translations must go before the next entry
        self.exit_count = 0
        self.apics: list[LocalApic] = [
            LocalApic(
                index,
                bsp=index == 0,
                clock=machine.clock,
                timers=machine.timers,
                bus=machine.routers[vtl],
                on_pending=self.kick,
                tsc_hz=machine.tsc_hz,
                timer_hz=APIC_TIMER_HZ,
                on_eoi=lambda vector, vtl=vtl: machine.apic_eoi(index, vtl, vector),
            )
            for vtl in range(len(machine.vms))
        ]
        # KVM answers CPUID in the kernel (no exit), so the table each vCPU gets is what a
        # trace records as its CPUID events (see Machine.boot).
        self.cpuid_tables = [machine.cpuid_for(index, vtl) for vtl in range(len(self.vcpus))]
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
        s = self.vcpus[vtl].get_sregs()
        if cpu_mode(s) is CpuMode.REAL:
            return 0
        return int(s.cs.dpl)

    def mode(self, vtl: int) -> CpuMode:
        return cpu_mode(self.vcpus[vtl].get_sregs())

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

    # -- kicks and waiting -------------------------------------------------------------
    def kick(self) -> None:
        """Make this VP look at its interrupts now (called from any thread)."""
        self.interrupt_hint = True
        with self.cond:
            self.wakeups += 1
            self.cond.notify_all()
        if self.in_guest:
            self.vcpu.run_struct.immediate_exit = 1
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
            r = kvm_run(vcpu.fd) if recorder is None else kvm_run_recorded(vcpu.fd, recorder)
            vcpu.sregs_exported = vcpu.sync_sregs  # what KVM exported with the exit is current (Vcpu.exited)
            self.in_guest = False
            self.exit_count += 1
            view = vcpu.run_view
            if view[IMMEDIATE_EXIT_OFFSET]:
                run.immediate_exit = 0
            self.exit_recorded = r
            if r:
                if r < 0:
                    if r in (-errno.EINTR, -errno.EAGAIN):
                        continue
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
        """
        hook = self.machine.pre_entry_hook
        if hook is not None:
            hook(self)
            run = self.vcpu.run_struct
        apic = self.apic
        vector = apic.pending_vector()
        if vector is None:
            self.interrupt_hint = False
            run.request_interrupt_window = 0
            return run
        if run.ready_for_interrupt_injection and run.if_flag:
            vector = apic.acknowledge()
            self.vcpu.interrupt(vector)
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
        if trap is not None:
            trap(self, port, size, direction == IO_OUT)
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
        raise GuestStop(EXIT_GUEST_FAULT, f"guest triple-faulted on VP {self.index} at rip={self.rip():#x}")

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
            raise GuestStop(EXIT_OK, "guest requested a reset (not supported: stopping)")
        raise GuestStop(EXIT_GUEST_FAULT, f"unexpected KVM system event {kind}")

    def on_unhandled(self) -> None:
        reason = self.vcpu.run_struct.exit_reason
        raise GuestStop(EXIT_VMM_ERROR, f"unhandled KVM exit {exit_name(reason)} on VP {self.index}")


class GuestClock:
    """Host monotonic time, and the guest's real TSC (host TSC + KVM's offset).

    TSC-deadline timers compare against the TSC the guest reads, so the clock
    must return exactly that, not a TSC made up from elapsed time.
    """

    def __init__(self, tsc_offset: int) -> None:
        self.tsc_offset = tsc_offset

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def tsc(self) -> int:
        return (int(lib.vsm_rdtsc()) + self.tsc_offset) & 0xFFFFFFFFFFFFFFFF


class MsrFault(Exception):
    """An MSR access that must raise #GP in the guest."""


class Machine:
    """A partition: guest RAM, one KVM VM per VTL, VPs, devices and the event sink."""

    def __init__(self, config: MachineConfig, sink: EventSink | None = None, *, kvm_path: str | None = None) -> None:
        config.validate()
        self.config = config
        self.sink: EventSink = sink if sink is not None else NullSink()
        self.kvm = Kvm(kvm_path or config.kvm_device)
        self._check_capabilities()
        self.capabilities = self._capabilities()
        self.memory = GuestMemory(config.memory_mib)
        self.stopping = False
        self.booted = False
        self.stop_event = threading.Event()
        self.exit_status: int | None = None
        self.stop_message = ""
        self._stop_lock = threading.Lock()
        self._warned: set[object] = set()
        self._halt_lock = threading.Lock()
        self.halted_no_if: set[int] = set()
        self._recorded_ports: Any = None  # bitmap of ports whose OUTs KVM_RUN records in C

        # Hooks later layers install (Hyper-V, VSM); None means "not present".
        self.trap_ports: dict[int, Callable[[VirtualProcessor, int, int, bool], None]] = {}
        self.msr_handlers: list[tuple[int, int, Any]] = []  # (first, last, handler with read/write)
        self.mmio_hook: Callable[[VirtualProcessor, int, int, bool], bool] | None = None
        self.internal_error_hook: Callable[[VirtualProcessor], bool] | None = None
        self.wake_hook: Callable[[VirtualProcessor], bool] | None = None
        self.pre_entry_hook: Callable[[VirtualProcessor], None] | None = None
        self.views: list[Any] = []  # vmm.vsm.memory_view.MemoryView per VTL
        self.vsm: Any = None
        self.hyperv_tlb: Any = None
        self.extra_cpuid: list[tuple[int, int, int, int, int, int, int]] = []
        self.reference_clock: Callable[[], int] | None = None
        self.on_vps_created: list[Callable[[], None]] = []
        self.on_interrupt_acknowledged: Callable[[VirtualProcessor, int], None] | None = None
        self.vtl_action_hook: Callable[[VirtualProcessor, Any], None] | None = None
        self.on_apic_eoi: Callable[[int, int, int], None] | None = None
        self.on_stop: list[Callable[[], None]] = []
        self.apic_timer_hz = APIC_TIMER_HZ
        self.cpuid_policy = CpuidPolicy()

        self.vms: list[Vm] = [self._create_vm() for _ in range(config.vtls)]
        self.supported_cpuid = self.kvm.supported_cpuid()

        self.pio = PioBus()
        self.mmio = MmioBus()
        self.serial = Uart16550(config.serial_out, on_output=self._on_serial)
        self.pio.add(COM1_BASE, PORT_COUNT, self.serial)
        self.pio.add(DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit(self._on_debug_exit))
        self.fw_cfg = FwCfg(self.memory.size, config.smp, config.cmdline)
        self.fw_cfg.add_file(FW_CFG_VERSION_FILE, __version__.encode())  # lets a guest tell it runs under vsmtrace
        self.pio.add(FW_CFG_SELECTOR_PORT, FW_CFG_PORT_COUNT, self.fw_cfg)
        pic = Pic8259Stub()
        self.pio.add(PIC_MASTER, PIC_PORTS, pic)
        self.pio.add(PIC_SLAVE, PIC_PORTS, pic)
        self.pio.add(POST_PORT, 1, Ignore())
        self.pio.add(RTC_INDEX_PORT, RTC_PORT_COUNT, CmosRtc())

        self.timers: TimerService | None = None
        self.routers = [
            ApicRouter(on_init=self._route_init, on_sipi=self._route_sipi, on_nmi=self._route_nmi)
            for _ in self.vms
        ]
        # The I/O APIC sends to VTL0's local APICs (a higher VTL has no legacy devices).
        self.ioapic = IoApic(self.routers[0])
        self.ioapic_info = IoApicInfo(self.ioapic.reset_id, IOAPIC_BASE, 0)  # what the MADT lists
        self.mmio.add(IOAPIC_BASE, IOAPIC_MMIO_SIZE, self.ioapic)
        self.serial.irq = lambda level: self.ioapic.set_isa_irq(COM1_IRQ, level)
        self.pc_testdev = PcTestdev(self.ioapic.set_isa_irq, self.ioapic.set_irq)
        for first, count in self.pc_testdev.port_ranges():
            self.pio.add(first, count, self.pc_testdev)
        self.mmio.add(IOMEM_BASE, IOMEM_SIZE, self.pc_testdev)
        self.vps: list[VirtualProcessor] = []
        self.hyperv: Any = None
        if config.hyperv is not None and config.hyperv.enabled:
            from vsmtrace.vmm.hyperv_backend import HypervBackend

            self.hyperv = HypervBackend(self, config.hyperv)
            if config.vtls > 1:
                from vsmtrace.vmm.vsm.backend import VsmBackend

                self.vsm = VsmBackend(self)
        self.tsc_hz = 0
        self.tsc_offset = 0
        self.clock: GuestClock | ManualClock | None = None
        self.deterministic: DeterministicTime | None = None  # --deterministic: time moves at exits only
        # The vCPUs exist from here on (their CPUID is final); boot() loads the kernel and
        # lets later layers (Hyper-V, VSM) attach, after a recorder may have been plugged in.
        self.vps = [VirtualProcessor(self, i) for i in range(config.smp)]
        # CPUID bits the policy hides that guest kernel code still sees (vmm/cpuid_probe.py)
        self.cpuid_hiding_ineffective = ineffective_hiding(self.kvm, self.vps[0].cpuid_tables[0], self.cpuid_policy)
        for vp in self.vps:
            for vtl, apic in enumerate(vp.apics):
                self.routers[vtl].add(apic)
            vp.apics[0].on_eoi_broadcast = self.ioapic.eoi

    # -- construction ----------------------------------------------------------------
    def _check_capabilities(self) -> None:
        k = self.kvm
        k.require(lib.KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY")
        k.require(lib.KVM_CAP_X86_USER_SPACE_MSR, "KVM_CAP_X86_USER_SPACE_MSR (user-space MSR exits)")
        k.require(lib.KVM_CAP_X86_MSR_FILTER, "KVM_CAP_X86_MSR_FILTER")
        k.require(lib.KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT")
        k.require(lib.KVM_CAP_GET_TSC_KHZ, "KVM_CAP_GET_TSC_KHZ")
        max_vcpus = k.check_extension(lib.KVM_CAP_MAX_VCPUS) or 1
        if self.config.smp > max_vcpus:
            raise KvmUnavailable(f"this KVM supports at most {max_vcpus} vCPUs per VM, --smp asked for {self.config.smp}")

    def _capabilities(self) -> dict[str, int]:
        names = [n for n in dir(lib) if n.startswith("KVM_CAP_")]
        return {n[len("KVM_CAP_") :].lower(): self.kvm.check_extension(getattr(lib, n)) for n in names}

    def _create_vm(self) -> Vm:
        vm = self.kvm.create_vm()
        for setter, addr in ((vm.set_tss_addr, TSS_ADDR), (vm.set_identity_map_addr, IDENTITY_MAP_ADDR)):
            try:
                setter(addr)
            except OSError:
                pass  # not needed (or not offered) by every backend
        reasons = 0
        for name in MSR_EXIT_REASONS:
            reasons |= getattr(lib, name)
        vm.enable_cap(lib.KVM_CAP_X86_USER_SPACE_MSR, reasons)
        return vm

    def map_ram(self) -> None:
        """Map all guest RAM into every VTL's VM (VSM narrows lower-VTL views later)."""
        from vsmtrace.vmm.vsm.memory_view import MemoryView

        self.views = [MemoryView(vm, self.memory, vtl) for vtl, vm in enumerate(self.vms)]
        for view in self.views:
            view.apply()

    def set_msr_filter(self, extra: list[tuple[int, int]] | None = None) -> None:
        ranges = [(MSR_IA32_APIC_BASE, 1), (MSR_IA32_TSC_DEADLINE, 1)] + list(extra or [])
        for vm in self.vms:
            vm.set_msr_filter(ranges)

    def cpuid_for(self, vp_index: int, vtl: int) -> list[tuple[int, int, int, int, int, int, int]]:
        self.cpuid_policy.extra_leaves = list(self.extra_cpuid)
        return build_cpuid(self.supported_cpuid, vp_index, self.config.smp, self.cpuid_policy)

    def boot(self) -> None:
        """Load the kernel and create the VPs (call once, before :meth:`run`)."""
        cfg = self.config
        self.map_ram()
        self.set_msr_filter([(first, last - first + 1) for first, last, _ in self.msr_handlers])
        modules = [Module(p, str(p)) for p in cfg.initrds]
        acpi = build_acpi_tables(cfg.smp, self.ioapic_info)
        self.memory.write(acpi.base, acpi.blob)
        boot = load_kernel(cfg.kernel, self.memory, cmdline=cfg.cmdline, modules=modules, rsdp=acpi.rsdp)
        self.check_cpuid_hiding(boot.protocol)
        for hook in self.on_vps_created:
            hook()
        if self.sink.enabled:
            for vp in self.vps:
                for vtl, table in enumerate(vp.cpuid_tables):
                    for fn, idx, _flags, a, b, c, d in table:
                        self.sink.emit(EventKind.CPUID, vp.index, vtl, None, leaf=fn, subleaf=idx, eax=a, ebx=b, ecx=c, edx=d)
        apply_boot_state(self.vps[0].vcpus[0], boot)
        self.booted = True

    def check_cpuid_hiding(self, protocol: str) -> None:
        """Say once which CPUID bits the policy hides in vain (measured when the machine was built).

        A warning for PVH kernels (real operating systems consult these bits); only a
        log line for vsmtrace's own guests, which are built without those instructions.
        """
        if not self.cpuid_hiding_ineffective:
            return
        names = ", ".join(self.cpuid_hiding_ineffective)
        message = (
            f"this KVM ignores vsmtrace's CPUID hiding of {names}: guest kernel code still sees them "
            "(Linux: boot with noxsave clearcpuid=popcnt; see docs/linux-guest.md)"
        )
        log.log(logging.WARNING if protocol == "pvh" else logging.INFO, "%s", message)

    def attach_exit_recorders(self) -> None:
        """Let KVM_RUN itself record OUTs to device ports (``vsm_kvm_run_recorded``) if the sink can.

        The sink's ``native_io`` is its C append function and argument. Needs the synced
        registers (RIP comes from kvm_run); not with --deterministic, whose EXIT event must
        come before the PIO event of the same exit. Trap ports are served, not recorded,
        so they stay out of the bitmap.
        """
        native = getattr(self.sink, "native_io", None) if self.sink.enabled else None
        if native is None or self.deterministic is not None:
            return
        ports = self._recorded_ports = ffi.new("uint8_t[]", PORTS // 8)
        for port in self.pio.devices:
            if port not in self.trap_ports:
                ports[port >> 3] |= 1 << (port & 7)
        fn, store = native
        for vp in self.vps:
            for vtl, vcpu in enumerate(vp.vcpus):
                if not vcpu.sync_regs:
                    continue
                rec = ffi.new("struct vsm_exit_recorder *")
                rec.run = vcpu.run_struct
                rec.record = ffi.cast("vsm_io_sink", fn)
                rec.store = ffi.cast("void *", store)
                rec.kind = int(PIO)
                rec.vp = vp.index
                rec.vtl = vtl
                rec.ports = ports
                vcpu.exit_recorder = rec

    # -- services for devices and layers ------------------------------------------------------
    def emit(self, kind: EventKind, vp: VirtualProcessor | None, **fields: Any) -> None:
        sink = self.sink
        if not sink.enabled:
            return
        if vp is None:
            sink.emit(kind, 0, 0, 0, **fields)
        else:
            sink.emit(kind, vp.index, vp.vtl, vp.rip(), **fields)

    def warn_once(self, key: object, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def init_clock(self, vcpu: Vcpu) -> None:
        """Learn the guest TSC rate and offset from the first vCPU; every APIC needs them."""
        self.tsc_hz = vcpu.tsc_khz() * 1000
        guest_tsc = vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
        self.tsc_offset = guest_tsc - int(lib.vsm_rdtsc())
        if self.config.deterministic:
            self.deterministic = DeterministicTime(self)
            self.clock, self.timers = self.deterministic.clock, self.deterministic.timers
            return
        self.clock = GuestClock(self.tsc_offset)
        self.timers = TimerService(self.clock)

    def guest_tsc(self) -> int:
        return int(lib.vsm_rdtsc()) + self.tsc_offset

    def read_gpa(self, vtl: int, gpa: int, size: int, access: Access = Access.READ) -> bytes:
        """Guest memory as ``vtl`` may see it: a hypercall can never reach past the caller's protections."""
        if self.views and not self.views[vtl].check(gpa, size, access):
            raise VtlAccessDenied(vtl, gpa, access)
        return self.memory.read(gpa, size)

    def write_gpa(self, vtl: int, gpa: int, data: bytes) -> None:
        if self.views and not self.views[vtl].check(gpa, len(data), Access.WRITE):
            raise VtlAccessDenied(vtl, gpa, Access.WRITE)
        self.memory.write(gpa, data)

    def vp(self, index: int) -> VirtualProcessor:
        return self.vps[index]

    def apic_eoi(self, vp_index: int, vtl: int, vector: int) -> None:
        if self.on_apic_eoi is not None:
            self.on_apic_eoi(vp_index, vtl, vector)

    def current_vp(self) -> VirtualProcessor | None:
        """The VP whose thread is calling, if any."""
        current = threading.current_thread()
        for vp in self.vps:
            if vp.thread is current:
                return vp
        return None

    def reference_time(self) -> int:
        if self.reference_clock is None:
            raise RuntimeError("no reference clock without Hyper-V")
        return self.reference_clock()

    @property
    def vp_count(self) -> int:
        return len(self.vps)

    def assert_interrupt(self, vp_index: int, vtl: int, vector: int) -> None:
        self.vps[vp_index].apics[vtl].accept_interrupt(vector)

    # -- MSRs ------------------------------------------------------------------------------------
    def msr_records_itself(self, index: int) -> bool:
        """Is this MSR served by a layer that emits its own MSR event (the Hyper-V emulation)?"""
        for first, last, handler in self.msr_handlers:
            if first <= index <= last:
                return bool(getattr(handler, "records_events", False))
        return False

    def msr_read(self, vp: VirtualProcessor, index: int) -> int:
        apic = vp.apic
        if index == MSR_IA32_APIC_BASE:
            return apic.base_msr
        if index == MSR_IA32_TSC_DEADLINE:
            return apic.tsc_deadline
        if MSR_X2APIC_FIRST <= index <= MSR_X2APIC_LAST:
            return apic.msr_read(index)
        for first, last, handler in self.msr_handlers:
            if first <= index <= last:
                return handler.msr_read(vp, index)
        raise MsrFault(index)

    def msr_write(self, vp: VirtualProcessor, index: int, value: int) -> None:
        apic = vp.apic
        if index == MSR_IA32_APIC_BASE:
            apic.base_msr = value
            vp.interrupt_hint = True
            return
        if index == MSR_IA32_TSC_DEADLINE:
            apic.tsc_deadline = value
            return
        if MSR_X2APIC_FIRST <= index <= MSR_X2APIC_LAST:
            apic.msr_write(index, value)
            vp.interrupt_hint = True
            vp.vcpu.run_struct.cr8 = vp.last_cr8 = apic.cr8
            return
        for first, last, handler in self.msr_handlers:
            if first <= index <= last:
                handler.msr_write(vp, index, value)
                return
        raise MsrFault(index)

    # -- APIC routing callbacks ----------------------------------------------------------------
    def _route_init(self, apic_id: int) -> None:
        if apic_id < len(self.vps):
            self.vps[apic_id].on_init()

    def _route_sipi(self, apic_id: int, vector: int) -> None:
        if apic_id < len(self.vps):
            self.vps[apic_id].on_sipi(vector)

    def _route_nmi(self, apic_id: int) -> None:
        if apic_id < len(self.vps):
            vp = self.vps[apic_id]
            vp.vcpu.nmi()
            vp.kick()

    # -- halts: detect a guest that can never run again ----------------------------------------
    def note_halt(self, vp: VirtualProcessor, interruptible: bool) -> None:
        if interruptible:
            return
        with self._halt_lock:
            self.halted_no_if.add(vp.index)
            stuck = all(
                v.index in self.halted_no_if or v.state is VpState.WAIT_FOR_SIPI or v.state is VpState.STOPPED
                for v in self.vps
            )
        if stuck and not self._woken_from_outside():
            self.request_stop(
                EXIT_GUEST_FAULT,
                f"guest halted with interrupts disabled on every VP (last: VP {vp.index} at rip={vp.rip():#x})",
                vp=vp,
            )

    def _woken_from_outside(self) -> bool:
        """Whether anything but the halted VTL's own interrupts could still wake a VP.

        With VSM that is an interrupt for a higher VTL, which needs a higher VTL to
        be enabled; until the guest enables one, a halt with IF=0 everywhere is final.
        """
        if self.wake_hook is None:
            return False
        enabled = getattr(self.vsm, "enabled_vtls", None)
        return enabled is None or len(enabled) > 1

    def note_wake(self, vp: VirtualProcessor) -> None:
        with self._halt_lock:
            self.halted_no_if.discard(vp.index)

    # -- stopping ---------------------------------------------------------------------------------
    def _on_debug_exit(self, value: int, status: int) -> None:
        extra = {"detail": self.deterministic.exit_detail()} if self.deterministic is not None else {}
        self.emit(EventKind.GUEST_EXIT, None, exit_status=value, message=f"isa-debug-exit {value:#x} (status {status})", **extra)
        self.request_stop(status, "")

    def _serial_input(self) -> None:
        """Feed what the user types (stdin) to the UART's receiver until EOF or the machine stops."""
        while not self.stopping:
            try:
                data = os.read(STDIN_FD, SERIAL_INPUT_CHUNK)
            except OSError:
                return
            if not data:
                return
            self.serial.feed(data)

    def _on_serial(self, data: bytes) -> None:
        if self.sink.enabled:
            vp = self.current_vp()
            if vp is None:
                self.sink.emit(EventKind.SERIAL, 0, 0, None, data=data)
            else:
                self.emit(EventKind.SERIAL, vp, data=data)

    def request_stop(self, status: int, message: str, vp: VirtualProcessor | None = None) -> None:
        with self._stop_lock:
            if self.exit_status is not None:
                return
            self.exit_status = status
            self.stop_message = message
            self.stopping = True
        if message and status != EXIT_OK:
            self.emit(EventKind.ERROR, None, message=message)
        self.stop_event.set()
        for v in self.vps:
            v.kick()

    def run(self) -> int:
        """Run until the guest exits, fails, times out or the user interrupts; returns the exit status."""
        if not self.booted:
            self.boot()
        self.attach_exit_recorders()
        for vp in self.vps:
            vp.start()
        if self.config.serial_in_interactive:
            threading.Thread(target=self._serial_input, name="serial-input", daemon=True).start()
        deadline = None if self.config.timeout_s is None else time.monotonic() + self.config.timeout_s
        try:
            while not self.stop_event.wait(0.1):
                if deadline is not None and time.monotonic() > deadline:
                    self.request_stop(EXIT_TIMEOUT, f"guest still running after --timeout {self.config.timeout_s:g} s")
                if all(v.state is VpState.STOPPED for v in self.vps):
                    self.request_stop(EXIT_VMM_ERROR, "every VP stopped without an exit status")
        except KeyboardInterrupt:
            self.request_stop(EXIT_INTERRUPTED, "interrupted (Ctrl-C)")
        for vp in self.vps:
            if vp.thread is not None:
                vp.thread.join(timeout=5)
        for hook in self.on_stop:
            hook()
        if self.timers is not None:
            self.timers.stop()
        assert self.exit_status is not None
        return self.exit_status


    def close(self) -> None:
        for vm in self.vms:
            vm.close()
        self.memory.close()
        self.kvm.close()
