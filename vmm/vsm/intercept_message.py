"""The HvMessageTypeGpaIntercept message a secure memory intercept posts to the higher VTL.

Layout (vsm-facts §3.4): the TLFS HV_X64_MEMORY_INTERCEPT_MESSAGE (0x50 payload bytes:
intercept header, cache type, instruction bytes, GVA, GPA) followed by the seed's register
tail (DS, SS, RAX..R15) so the payload is the seed's 240 bytes. Windows reads only the TLFS
part; the tail helps a higher VTL that emulates the access without a GetVpRegisters round
trip, and is harmless padding otherwise (§6.6).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from vsmtrace.vmm.hyperv.hvdef import (
    HV_SEED_INTERCEPT_PAYLOAD_SIZE,
    HV_SEED_INTERCEPT_TAIL_GPRS,
    HV_SEED_INTERCEPT_TAIL_SEGMENTS,
    HvCacheType,
    HvInterceptAccessType,
    HvMessage,
    HvMessageType,
    HvX64InterceptMessageHeader,
    HvX64MemoryAccessInfo,
    HvX64MemoryInterceptMessage,
    HvX64SegmentRegister,
    HvX64VpExecutionState,
)
from vsmtrace.vmm.vp import Access, CpuMode, Segment

#: Architectural x86 bits the execution state reports (not Hyper-V numbers).
_CR0_PE = 1 << 0
_CR0_AM = 1 << 18
_EFER_LMA = 1 << 10
_MAX_INSN_BYTES = 16
_RFLAGS_RF = 1 << 16  # architectural resume flag
#: The seed reports an execute intercept with instruction length 2 and no instruction bytes
#: (docs/vsm.md, compatibility table); the TLFS does not say what a failed fetch reports.
SEED_EXECUTE_INSN_LENGTH = 2
_U64 = (1 << 64) - 1


def access_type(access: Access) -> HvInterceptAccessType:
    """Access → the intercept's enum (a read-modify-write counts as a write)."""
    if access & Access.WRITE:
        return HvInterceptAccessType.WRITE
    if access & Access.EXECUTE:
        return HvInterceptAccessType.EXECUTE
    return HvInterceptAccessType.READ


def execution_state(
    cpl: int, mode: CpuMode, intercepted_vtl: int, *, cr0: int | None = None, debug_active: bool = False,
    interruption_pending: bool = False,
) -> int:  # fmt: skip
    """HV_X64_VP_EXECUTION_STATE: CPL, CR0.PE, CR0.AM, EFER.LMA, debug, pending event, VTL."""
    e = HvX64VpExecutionState
    state = cpl & e.CPL_MASK
    protected = mode != CpuMode.REAL if cr0 is None else bool(cr0 & _CR0_PE)
    if protected:
        state |= e.CR0_PE
    if cr0 is not None and cr0 & _CR0_AM:
        state |= e.CR0_AM
    if mode in (CpuMode.LONG, CpuMode.COMPAT):
        state |= e.EFER_LMA
    if debug_active:
        state |= e.DEBUG_ACTIVE
    if interruption_pending:
        state |= e.INTERRUPTION_PENDING
    state |= (intercepted_vtl & e.VTL_MASK) << e.VTL_SHIFT
    return state


def _segment(seg: Segment | None) -> bytes:
    if seg is None:
        return bytes(HvX64SegmentRegister.SIZE)
    return HvX64SegmentRegister(seg.base & _U64, seg.limit, seg.selector, seg.attributes).pack()


def build_intercept(
    vp: int,
    intercepted_vtl: int,
    access: Access,
    gpa: int,
    gva: int | None,
    insn_bytes: bytes,
    regs: Mapping[str, int],
    segments: Mapping[str, Segment],
    rip: int | None = None,
    rflags: int | None = None,
    insn_length: int = 0,
    cpl: int = 0,
    mode: CpuMode = CpuMode.LONG,
    *,
    cr0: int | None = None,
    efer: int | None = None,
    debug_active: bool = False,
    interruption_pending: bool = False,
    tlb_locked: bool = False,
) -> HvMessage:
    """Build the GPA-intercept message for a denied access of ``intercepted_vtl`` on ``vp``.

    ``regs`` holds RAX..R15 (missing names read as 0) and, unless ``rip`` / ``rflags`` are
    given, RIP and RFLAGS; ``segments`` CS, DS, SS (others ignored). RIP is the faulting
    instruction (not advanced). ``cr0`` gives CR0.PE/AM (else PE follows ``mode``), ``efer``
    gives EFER.LMA (else it follows ``mode``). At most 16 instruction bytes are reported.

    Byte-compatible with the seed where the TLFS allows (docs/vsm.md): RFLAGS has RF set, as
    hardware saves it on an EPT-violation exit (a handler that resumes the instruction relies
    on it); an execute intercept reports instruction length 2 and no instruction bytes,
    whatever ``insn_bytes`` / ``insn_length`` say.
    """
    rip = regs.get("rip", 0) if rip is None else rip
    rflags = (regs.get("rflags", 0) if rflags is None else rflags) | _RFLAGS_RF
    if access_type(access) is HvInterceptAccessType.EXECUTE:
        insn_length, insn_bytes = SEED_EXECUTE_INSN_LENGTH, b""
    state = execution_state(cpl, mode, intercepted_vtl, cr0=cr0, debug_active=debug_active,
                            interruption_pending=interruption_pending)  # fmt: skip
    if efer is not None:
        state &= ~HvX64VpExecutionState.EFER_LMA
        if efer & _EFER_LMA:
            state |= HvX64VpExecutionState.EFER_LMA
    header = HvX64InterceptMessageHeader(
        vp_index=vp,
        instruction_length=insn_length,
        intercept_access_type=access_type(access),
        execution_state=state,
        cs=_segment(segments.get("cs")),
        rip=rip & _U64,
        rflags=rflags & _U64,
    )
    info = 0
    if gva is not None:
        info |= HvX64MemoryAccessInfo.GVA_VALID
    if tlb_locked:
        info |= HvX64MemoryAccessInfo.TLB_LOCKED
    insn = bytes(insn_bytes[:_MAX_INSN_BYTES])
    body = HvX64MemoryInterceptMessage(
        header=header.pack(),
        cache_type=HvCacheType.WRITE_BACK,
        instruction_byte_count=len(insn),
        memory_access_info=info,
        guest_virtual_address=(gva or 0) & _U64,
        guest_physical_address=gpa & _U64,
        instruction_bytes=insn.ljust(_MAX_INSN_BYTES, b"\0"),
    ).pack()
    tail = b"".join(_segment(segments.get(name)) for name in HV_SEED_INTERCEPT_TAIL_SEGMENTS)
    tail += struct.pack(f"<{len(HV_SEED_INTERCEPT_TAIL_GPRS)}Q", *(regs.get(n, 0) & _U64 for n in HV_SEED_INTERCEPT_TAIL_GPRS))
    payload = (body + tail).ljust(HV_SEED_INTERCEPT_PAYLOAD_SIZE, b"\0")
    return HvMessage.build(HvMessageType.HvMessageTypeGpaIntercept, payload)
