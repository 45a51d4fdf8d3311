"""Deterministic mode (``vsmtrace run --deterministic``): time that moves only at exits.

Guest re-execution (``replayer/reexecute.py``) can only reproduce a guest whose
nondeterminism reaches it through exits. Live timers break that: a host timer
thread fires whenever the host schedules it and kicks the VP out of KVM_RUN at an
arbitrary instruction. Here instead:

* the guest-visible clock is a :class:`~vmm.timers.ManualClock` advanced by a fixed
  quantum at every exit (and jumped to the next timer deadline when the VP halts),
* timers live in a :class:`~vmm.timers.ManualTimerService` whose due callbacks run
  synchronously in the VP thread at the exit, so an APIC or synthetic-timer
  interrupt is always injected right after a known exit,
* every exit is recorded as an ``EXIT`` event with RIP, the packed GPRs and the
  interrupt-window flag of the entry that ended in it: what re-execution compares.

KVM serves ``rdmsr IA32_TSC`` in the kernel, like RDTSC, so without help a guest
that reads the TSC through the MSR (e.g. ``rdmsr_safe(0x10)``) would store host
cycles in its memory, unseen by any exit. In this mode IA32_TSC is routed to
userspace and reads the *virtual* TSC (the one TSC-deadline timers compare
against); the value is an ordinary recorded MSR input.

What stays nondeterministic is whatever the guest reads without an exit, i.e. the
raw TSC (``rdtsc``, ``rdtscp``). KVM has no RDTSC exit to userspace, so a guest whose control
flow or registers depend on raw TSC values cannot be re-executed exactly (see
docs/reexecute.md). The Hyper-V reference TSC page is therefore published invalid
(sequence 0) in this mode, so enlightened guests read TIME_REF_COUNT, which exits.
"""

from __future__ import annotations

import hashlib
import struct
from typing import TYPE_CHECKING, Any

from vsmtrace.vmm.cpu_state import GPR_NAMES
from vsmtrace.vmm.events import EventKind
from vsmtrace.vmm.stops import EXIT_GUEST_FAULT, GuestStop
from vsmtrace.vmm.timers import ManualClock, ManualTimerService

if TYPE_CHECKING:
    from vsmtrace.vmm.machine import Machine
    from vsmtrace.vmm.virtual_processor import VirtualProcessor

#: Virtual nanoseconds added per exit: small enough that timer-driven guests are not
#: slowed down in virtual time, large enough that spinning on an MSR read moves time.
DEFAULT_QUANTUM_NS = 1000

#: Order of the registers packed into the EXIT ``gprs`` column (18 little-endian u64).
GPR_ORDER = GPR_NAMES
_GPR_STRUCT = struct.Struct("<18Q")

#: EXIT ``entry_flags`` bits: what the VMM asked of KVM for the entry that ended in this exit.
ENTRY_IRQ_WINDOW = 1


def pack_gprs(regs: Any) -> bytes:
    """The GPRs, RIP and RFLAGS of a ``struct kvm_regs`` in :data:`GPR_ORDER`."""
    return _GPR_STRUCT.pack(*(int(getattr(regs, name)) for name in GPR_ORDER))


def unpack_gprs(data: bytes) -> dict[str, int]:
    return dict(zip(GPR_ORDER, _GPR_STRUCT.unpack(data), strict=True))


def ram_sha256(machine: Machine) -> str:
    """Hash of all guest RAM: record and re-execution compare it at the guest's exit."""
    return hashlib.sha256(machine.memory.map).hexdigest()


class DeterministicTime:
    """Virtual clock and synchronous timers for one machine, driven by its (single) VP's exits."""

    def __init__(self, machine: Machine, quantum_ns: int = DEFAULT_QUANTUM_NS) -> None:
        if quantum_ns <= 0:
            raise ValueError("the deterministic clock quantum must be positive")
        self.machine = machine
        self.quantum_ns = quantum_ns
        self.clock = ManualClock(machine.tsc_hz)
        self.timers = ManualTimerService(self.clock)
        self.exits = 0

    def msr_read(self, vp: VirtualProcessor, index: int) -> int:
        """RDMSR IA32_TSC: the virtual TSC, a recorded input like any MSR read that exits."""
        return self.clock.tsc()

    def msr_write(self, vp: VirtualProcessor, index: int, value: int) -> None:
        """WRMSR IA32_TSC: moves the virtual TSC (MSR reads, TSC-deadline timers); RDTSC stays raw."""
        self.clock.set_tsc(value)

    def at_exit(self, vp: VirtualProcessor, exit_reason: int) -> None:
        """Record the exit, then advance virtual time one quantum and fire what is due."""
        from vsmtrace.vmm.kvm.exits import exit_name

        self.exits += 1
        sink = self.machine.sink
        if sink.enabled:
            run = vp.vcpu.run_struct
            regs = vp.vcpu.get_regs()
            sink.emit(
                EventKind.EXIT,
                vp.index,
                vp.vtl,
                int(regs.rip),
                exit_reason=exit_name(exit_reason),
                exit_code=exit_reason,
                gprs=pack_gprs(regs),
                entry_flags=ENTRY_IRQ_WINDOW if run.request_interrupt_window else 0,
            )
        self.timers.advance_to(self.clock.now_ns() + self.quantum_ns)

    def halt(self, vp: VirtualProcessor, interruptible: bool) -> None:
        """HLT: nothing but a timer can wake a lone VP, so jump time to the next deadline."""
        machine = self.machine
        if not interruptible and machine.wake_hook is None:
            machine.note_halt(vp, False)  # stops the machine: it can never run again
            return
        while not machine.stopping and not vp.can_wake(interruptible):
            deadline = self.timers.next_deadline()
            if deadline is None:
                raise GuestStop(
                    EXIT_GUEST_FAULT,
                    f"guest halted at rip={vp.rip():#x} with no timer armed (--deterministic: nothing else can wake it)",
                )
            self.timers.advance_to(max(deadline, self.clock.now_ns()))

    def exit_detail(self) -> dict[str, Any]:
        """Extras for the GUEST_EXIT event: the RAM hash re-execution must reproduce."""
        return {"ram_sha256": ram_sha256(self.machine), "exits": self.exits, "virtual_ns": self.clock.now_ns()}
