"""The hypercall page the VMM writes when the guest enables HV_X64_MSR_HYPERCALL.

Here a guest ``VMCALL`` never exits to userspace (PVM backend, no in-kernel Hyper-V), so the
page traps with port I/O instead: ``out HV_HYPERCALL_TRAP_PORT, al`` followed by ``ret``.
``out imm8, al`` *reads* AL and writes no register, so every register of the TLFS contract
reaches the VMM untouched: RCX = input value, RDX/R8 = GPAs or fast input, XMM0-5 = XMM fast
input. The VMM writes the result into RAX (and fast output into RDX/R8/XMM) before the
guest resumes at the ``ret``. The same bytes work on stock kvm_intel/kvm_amd.

One port, one trap instruction for all entry points: like VMCALL on real Hyper-V, the call
code in the input value tells a hypercall from a VTL call/return. The VTL stubs follow
vsm-facts §1.5 / OpenVMM: they move the VTL control input from RCX to RAX and load the call
code (0x11 / 0x12) into ECX, so at the trap RCX = code and RAX = VTL control input. RAX and
RCX are the only registers a VTL stub changes, which the TLFS allows (both are volatile
in the VTL call contract; the return path reloads them from the VTL control area).

Layout (every entry point self-contained, no jumps; gaps are ``int3``)::

    0x00  out 0x58, al ; ret                                  hypercall (x64 and x86)
    0x10  mov rax, rcx ; mov ecx, 0x11 ; out 0x58, al ; ret    VTL call, 64-bit
    0x20  mov rax, rcx ; mov ecx, 0x12 ; out 0x58, al ; ret    VTL return, 64-bit
    0x30  mov ecx, eax ; mov eax, 0x11 ; out 0x58, al ; ret    VTL call, 32-bit (EDX:EAX in, ECX out)
    0x40  mov ecx, eax ; mov eax, 0x12 ; out 0x58, al ; ret    VTL return, 32-bit

HvRegisterVsmCodePageOffsets reports ``VTL_CALL_OFFSET | VTL_RETURN_OFFSET << 12`` for
64-bit VTLs (``vsm_code_page_offsets(bit64=False)`` for 32-bit ones).

32-bit callers: the hypercall entry at 0x00 decodes identically in 32-bit mode, and the
dispatcher implements the x86 register convention (EDX:EAX, EBX:ECX, EDI:ESI; one fast pair,
no XMM). The machine sees a 1-byte OUT to the trap port in both modes.
"""

from __future__ import annotations

import struct

from vsmtrace.vmm.hyperv.hvdef import (
    HV_PAGE_SIZE,
    HypercallCode,
    VsmCodePageOffsets,
)

#: I/O port the hypercall page stubs write to (``out imm8, al``): vsmtrace's choice, not the
#: TLFS's. 0x58 is unused by every PC device this VMM emulates (PIC 0x20/0xA0, PIT 0x40, KBC
#: 0x60, RTC 0x70, POST 0x80, debug-exit 0xF4, UART 0x3F8, fw_cfg 0x510) and fits the imm8
#: form so no GPR is needed for the port number (RDX carries hypercall input).
HV_HYPERCALL_TRAP_PORT = 0x58
HV_HYPERCALL_TRAP_SIZE = 1  # ``out imm8, al`` is a 1-byte access
HV_HYPERCALL_TRAP_INSN_LEN = 2  # length of ``out imm8, al``; rewind by this to re-execute

HYPERCALL_OFFSET = 0x00
VTL_CALL_OFFSET = 0x10
VTL_RETURN_OFFSET = 0x20
VTL_CALL_OFFSET_32 = 0x30
VTL_RETURN_OFFSET_32 = 0x40

# x86 encodings (instruction bytes, not Hyper-V numbers).
_OUT_IMM8_AL = 0xE6
_RET = 0xC3
_INT3 = 0xCC
_MOV_RAX_RCX = bytes((0x48, 0x89, 0xC8))  # mov rax, rcx
_MOV_ECX_EAX = bytes((0x89, 0xC1))  # mov ecx, eax
_MOV_ECX_IMM32 = 0xB9  # mov ecx, imm32 (zero-extends into RCX in 64-bit mode)
_MOV_EAX_IMM32 = 0xB8  # mov eax, imm32


#: The trapping instruction itself, ``out 0x58, al``.
TRAP_INSTRUCTION = bytes((_OUT_IMM8_AL, HV_HYPERCALL_TRAP_PORT))
assert len(TRAP_INSTRUCTION) == HV_HYPERCALL_TRAP_INSN_LEN


def _trap_and_ret() -> bytes:
    return TRAP_INSTRUCTION + bytes((_RET,))


def _vtl_stub_64(code: int) -> bytes:
    return _MOV_RAX_RCX + bytes((_MOV_ECX_IMM32,)) + struct.pack("<I", code) + _trap_and_ret()


def _vtl_stub_32(code: int) -> bytes:
    return _MOV_ECX_EAX + bytes((_MOV_EAX_IMM32,)) + struct.pack("<I", code) + _trap_and_ret()


class HypercallPage:
    """Builds the page bytes and reports the VTL call/return offsets."""

    ENTRY_POINTS: dict[str, int] = {
        "hypercall": HYPERCALL_OFFSET,
        "vtl_call": VTL_CALL_OFFSET,
        "vtl_return": VTL_RETURN_OFFSET,
        "vtl_call_32": VTL_CALL_OFFSET_32,
        "vtl_return_32": VTL_RETURN_OFFSET_32,
    }

    @staticmethod
    def build() -> bytes:
        page = bytearray([_INT3]) * HV_PAGE_SIZE
        stubs = {
            HYPERCALL_OFFSET: _trap_and_ret(),
            VTL_CALL_OFFSET: _vtl_stub_64(HypercallCode.HvCallVtlCall),
            VTL_RETURN_OFFSET: _vtl_stub_64(HypercallCode.HvCallVtlReturn),
            VTL_CALL_OFFSET_32: _vtl_stub_32(HypercallCode.HvCallVtlCall),
            VTL_RETURN_OFFSET_32: _vtl_stub_32(HypercallCode.HvCallVtlReturn),
        }
        for offset, code in stubs.items():
            page[offset : offset + len(code)] = code
        return bytes(page)

    @staticmethod
    def vsm_code_page_offsets(bit64: bool = True) -> int:
        """Value of HvRegisterVsmCodePageOffsets for a 64-bit (or 32-bit) VTL."""
        if bit64:
            return VsmCodePageOffsets.encode(VTL_CALL_OFFSET, VTL_RETURN_OFFSET)
        return VsmCodePageOffsets.encode(VTL_CALL_OFFSET_32, VTL_RETURN_OFFSET_32)
