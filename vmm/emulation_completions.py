"""Instructions the VMM finishes itself when KVM's instruction emulator gives up on them.

On backends where KVM emulates guest supervisor code instruction by instruction
(see docs/linux-guest.md, "This host"), an instruction the emulator lacks stops
the VP with ``KVM_EXIT_INTERNAL_ERROR`` / ``KVM_INTERNAL_ERROR_EMULATION``. For a
few instructions whose architectural effect is simple and needs nothing the VMM
cannot see, the VMM completes the instruction at that exit instead, exactly as
the SDM defines it, and the guest goes on. The table is keyed by iced-x86's
decoded instruction code (so prefixes and operand sizes are already resolved),
and it is consulted only at an emulation failure: where KVM emulates (or the
CPU runs) an instruction itself, no entry ever fires.

Entries (each exercised by ``guests/programs/completions.c``):

* ``int3`` (CC): a trap-class #BP. RIP moves past the instruction, then vector 3
  is injected, so the handler's frame holds the address after ``int3``.
* ``fwait``/``wait`` (9B): waits for pending x87 exceptions. With none pending
  and unmasked it is a no-op (RIP moves on); otherwise it raises #MF (vector 16,
  fault class: RIP stays on the ``fwait``) when CR0.NE = 1. With CR0.NE = 0 the
  exception would be signalled on the legacy FERR# line, which vsmtrace does not
  wire; the instruction is then completed as a no-op and the VMM warns once.

Every other instruction still stops the run with a message naming it
(:mod:`vsmtrace.vmm.guest_errors`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import iced_x86
from vsmtrace.vmm.guest_errors import decode_instruction, fetch_instruction
from vsmtrace.vmm.kvm.system import ffi

if TYPE_CHECKING:
    from vsmtrace.vmm.virtual_processor import VirtualProcessor

KVM_INTERNAL_ERROR_EMULATION = 1
VECTOR_BP = 3
VECTOR_MF = 16
CR0_NE = 1 << 5
X87_EXCEPTION_BITS = 0x3F  # IE DE ZE OE UE PE, in both FSW (flags) and FCW (masks)

Complete = Callable[["VirtualProcessor", int, iced_x86.Instruction], str]


@dataclass(frozen=True)
class Completion:
    """One table entry: how to finish an instruction KVM could not emulate."""

    mnemonic: str
    complete: Complete  # (vp, vtl, decoded instruction) -> what was done, for the trace and logs


def _advance(vp: VirtualProcessor, vtl: int, insn: iced_x86.Instruction) -> None:
    vp.set_register(vtl, "rip", insn.next_ip)


def complete_int3(vp: VirtualProcessor, vtl: int, insn: iced_x86.Instruction) -> str:
    """#BP is a trap: the saved RIP is the instruction after ``int3``."""
    _advance(vp, vtl, insn)
    vp.inject_exception(vtl, VECTOR_BP)
    return "int3: #BP injected"


def x87_exception_pending(fcw: int, fsw: int) -> bool:
    """An x87 exception flag is set in FSW whose mask bit in FCW is clear."""
    return bool(fsw & ~fcw & X87_EXCEPTION_BITS)


def x87_control_status(vp: VirtualProcessor, vtl: int) -> tuple[int, int]:
    """(FCW, FSW) from the XSAVE image's legacy region.

    Not KVM_GET_FPU: on this host it returned the state from before an emulated
    ``fninit`` while KVM_GET_XSAVE (and the guest's own fnstsw) already saw the new one.
    """
    legacy = bytes(ffi.buffer(vp.vcpus[vtl].get_xsave().region, 4))
    return int.from_bytes(legacy[0:2], "little"), int.from_bytes(legacy[2:4], "little")


def complete_fwait(vp: VirtualProcessor, vtl: int, insn: iced_x86.Instruction) -> str:
    """No-op unless an unmasked x87 exception is pending; then #MF on the ``fwait`` itself."""
    fcw, fsw = x87_control_status(vp, vtl)
    if x87_exception_pending(fcw, fsw):
        cr0 = int(vp.get_register(vtl, "cr0"))  # type: ignore[arg-type]
        if cr0 & CR0_NE:
            vp.inject_exception(vtl, VECTOR_MF)
            return "fwait: #MF injected"
        vp.machine.warn_once(
            ("fwait-ferr", vp.index),
            "guest executed fwait with an x87 exception pending and CR0.NE=0: FERR# is not wired, completed as a no-op",
        )
    _advance(vp, vtl, insn)
    return "fwait: no exception pending"


COMPLETIONS: dict[int, Completion] = {
    iced_x86.Code.INT3: Completion("int3", complete_int3),
    iced_x86.Code.WAIT: Completion("fwait", complete_fwait),
}

def decode_at_rip(vp: VirtualProcessor, vtl: int) -> iced_x86.Instruction | None:
    """The instruction at the VP's RIP (through its page tables), or None if unreadable/invalid."""
    rip, code = fetch_instruction(vp, vtl)
    return decode_instruction(code, rip, vp.mode(vtl))


def try_complete(vp: VirtualProcessor, suberror: int) -> str | None:
    """Complete the instruction behind an emulation failure if the table knows it.

    Returns a short description of what was done, or None when the exit must stop the
    run as before (another suberror, an unknown instruction, unreadable code).
    """
    if suberror != KVM_INTERNAL_ERROR_EMULATION:
        return None
    vtl = vp.vtl
    insn = decode_at_rip(vp, vtl)
    if insn is None:
        return None
    entry = COMPLETIONS.get(insn.code)
    if entry is None:
        return None
    return entry.complete(vp, vtl, insn)
