"""Turning a KVM emulation failure into a message that names the instruction.

On backends where KVM emulates guest supervisor code, an instruction its
emulator lacks (cmpxchg16b, xrstor, int3, clac, popcnt, fwait, ...) stops the
guest with KVM_EXIT_INTERNAL_ERROR. Users need to know which instruction and
where, so the bytes at RIP are decoded with iced-x86.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import iced_x86
from vsmtrace.vmm.guest_walk import read_linear, rip_linear, translator
from vsmtrace.vmm.vp import CpuMode

if TYPE_CHECKING:
    from vsmtrace.vmm.virtual_processor import VirtualProcessor

SUBERRORS = {
    1: "instruction emulation failed",
    2: "exception while delivering an exception",
    3: "exception during event delivery",
    4: "unexpected exit during event delivery",
}
MAX_INSN = 15


def fetch_instruction(vp: VirtualProcessor, vtl: int) -> tuple[int, bytes]:
    """(rip, up to 15 bytes at rip), translating through the guest's page tables."""
    vcpu = vp.vcpus[vtl]
    rip, linear = rip_linear(vcpu)
    return rip, read_linear(vp.machine.memory, translator(vcpu), linear, MAX_INSN)


def decode_instruction(code: bytes, rip: int, mode: CpuMode) -> iced_x86.Instruction | None:
    """The first instruction in ``code`` as the CPU in ``mode`` sees it, or None if invalid."""
    bitness = {CpuMode.LONG: 64, CpuMode.REAL: 16}.get(mode, 32)
    if not code:
        return None
    insn = iced_x86.Decoder(bitness, code, ip=rip).decode()
    if insn.code == iced_x86.Code.INVALID:
        return None
    return insn


def decode(code: bytes, rip: int, mode: CpuMode) -> str | None:
    insn = decode_instruction(code, rip, mode)
    if insn is None:
        return None
    return iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL).format(insn)


def describe_internal_error(vp: VirtualProcessor, suberror: int, data: list[int]) -> str:
    vtl = vp.vtl
    rip, code = fetch_instruction(vp, vtl)
    text = decode(code, rip, vp.mode(vtl))
    what = SUBERRORS.get(suberror, f"internal error {suberror}")
    where = f"VP {vp.index} VTL{vtl} rip={rip:#x}"
    if text is not None:
        return f"KVM cannot emulate `{text}` ({what}) at {where}; rebuild the guest without this instruction"
    return f"KVM {what} at {where} (bytes {code.hex() or 'unreadable'})"
