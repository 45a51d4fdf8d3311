"""Register access for HvCallGetVpRegisters / HvCallSetVpRegisters.

Which registers, and how:

* architectural (GPRs, RIP, RFLAGS, CR0/2/3/4/8, DR0-3/6/7, EFER, syscall MSRs, PAT,
  TSC_AUX, APIC base, KernelGsBase, segments, GDTR/IDTR) → ``VpAccess.get/set_register``
  of the target (VP, VTL); FS/GS base travel in the Fs/Gs segment values (TLFS).
* synthetic per (VP, VTL) (VP assist page, hypercall MSR, guest OS ID, VP index, time ref
  count, reference TSC, SynIC, synthetic timers) → that (VP, VTL)'s Hyper-V MSR object, so
  the same checks as RDMSR/WRMSR apply (a #GP there is INVALID_REGISTER_VALUE here).
* VSM registers → :class:`vmm.vsm.state.VsmState` (through the facade).
* HvRegisterPendingEvent0 (exception form only) → ``VpAccess.inject_exception`` at once.

Statuses: a name the TLFS does not define, a defined name this VMM does not serve (XMM/x87,
APIC registers, MTRRs, ...) or a write to a read-only register → INVALID_PARAMETER (the TLFS
return tables, and what the seed returns for everything it does not handle; OpenVMM's
UNKNOWN_REGISTER_NAME 0x87 is not a TLFS status, docs/vsm.md); a bad value
→ INVALID_REGISTER_VALUE; a per-(VP, VTL) register of a VTL not enabled on that VP →
INVALID_VTL_STATE.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from vsmtrace.vmm.hyperv.errors import GpFault
from vsmtrace.vmm.hyperv.handlers.common import HandlerError
from vsmtrace.vmm.hyperv.hvdef import (
    HV_REGISTER_VALUE_SIZE,
    HV_STIMER_COUNT,
    HV_STIMER_MSR_STRIDE,
    HV_SYNIC_SINT_COUNT,
    HvMsr,
    HvRegisterName,
    HvStatus,
    HvX64SegmentRegister,
    HvX64TableRegister,
    PendingEventType,
    PendingExceptionEvent,
    VsmCapabilities,
    VsmPartitionStatus,
    VsmVina,
    VsmVpSecureConfig,
    VsmVpStatus,
)
from vsmtrace.vmm.hyperv.hypercall_page import HypercallPage
from vsmtrace.vmm.vp import CpuMode, Segment, Table, VpAccess
from vsmtrace.vmm.vsm import control_regs

if TYPE_CHECKING:
    from vsmtrace.vmm.vsm import Vsm

R = HvRegisterName
_U64 = (1 << 64) - 1
_X86_EXCEPTION_VECTORS = 32  # architectural: vectors 0..31 are exceptions
_X86_PAGE_FAULT = 14

#: 64-bit architectural registers → VP interface names.
ARCH_REGISTERS: dict[HvRegisterName, str] = {
    R.HvX64RegisterRax: "rax", R.HvX64RegisterRcx: "rcx", R.HvX64RegisterRdx: "rdx", R.HvX64RegisterRbx: "rbx",
    R.HvX64RegisterRsp: "rsp", R.HvX64RegisterRbp: "rbp", R.HvX64RegisterRsi: "rsi", R.HvX64RegisterRdi: "rdi",
    R.HvX64RegisterR8: "r8", R.HvX64RegisterR9: "r9", R.HvX64RegisterR10: "r10", R.HvX64RegisterR11: "r11",
    R.HvX64RegisterR12: "r12", R.HvX64RegisterR13: "r13", R.HvX64RegisterR14: "r14", R.HvX64RegisterR15: "r15",
    R.HvX64RegisterRip: "rip", R.HvX64RegisterRflags: "rflags",
    R.HvX64RegisterCr0: "cr0", R.HvX64RegisterCr2: "cr2", R.HvX64RegisterCr3: "cr3", R.HvX64RegisterCr4: "cr4",
    R.HvX64RegisterCr8: "cr8",
    R.HvX64RegisterDr0: "dr0", R.HvX64RegisterDr1: "dr1", R.HvX64RegisterDr2: "dr2", R.HvX64RegisterDr3: "dr3",
    R.HvX64RegisterDr6: "dr6", R.HvX64RegisterDr7: "dr7",
    R.HvX64RegisterEfer: "efer", R.HvX64RegisterKernelGsBase: "kernel_gs_base", R.HvX64RegisterApicBase: "apic_base",
    R.HvX64RegisterPat: "pat", R.HvX64RegisterSysenterCs: "sysenter_cs", R.HvX64RegisterSysenterEip: "sysenter_eip",
    R.HvX64RegisterSysenterEsp: "sysenter_esp", R.HvX64RegisterStar: "star", R.HvX64RegisterLstar: "lstar",
    R.HvX64RegisterCstar: "cstar", R.HvX64RegisterSfmask: "sfmask", R.HvX64RegisterTscAux: "tsc_aux",
}  # fmt: skip

SEGMENT_REGISTERS: dict[HvRegisterName, str] = {
    R.HvX64RegisterEs: "es", R.HvX64RegisterCs: "cs", R.HvX64RegisterSs: "ss", R.HvX64RegisterDs: "ds",
    R.HvX64RegisterFs: "fs", R.HvX64RegisterGs: "gs", R.HvX64RegisterLdtr: "ldtr", R.HvX64RegisterTr: "tr",
}  # fmt: skip

TABLE_REGISTERS: dict[HvRegisterName, str] = {R.HvX64RegisterIdtr: "idtr", R.HvX64RegisterGdtr: "gdtr"}


def _synthetic_msrs() -> dict[HvRegisterName, HvMsr]:
    table = {
        R.HvRegisterVpAssistPage: HvMsr.HV_X64_MSR_VP_ASSIST_PAGE,
        R.HvX64RegisterHypercall: HvMsr.HV_X64_MSR_HYPERCALL,
        R.HvRegisterGuestOsId: HvMsr.HV_X64_MSR_GUEST_OS_ID,
        R.HvRegisterVpIndex: HvMsr.HV_X64_MSR_VP_INDEX,
        R.HvRegisterTimeRefCount: HvMsr.HV_X64_MSR_TIME_REF_COUNT,
        R.HvRegisterReferenceTsc: HvMsr.HV_X64_MSR_REFERENCE_TSC,
        R.HvRegisterScontrol: HvMsr.HV_X64_MSR_SCONTROL,
        R.HvRegisterSversion: HvMsr.HV_X64_MSR_SVERSION,
        R.HvRegisterSifp: HvMsr.HV_X64_MSR_SIEFP,
        R.HvRegisterSipp: HvMsr.HV_X64_MSR_SIMP,
        R.HvRegisterEom: HvMsr.HV_X64_MSR_EOM,
    }
    for i in range(HV_SYNIC_SINT_COUNT):
        table[HvRegisterName(R.HvRegisterSint0 + i)] = HvMsr(HvMsr.HV_X64_MSR_SINT0 + i)
    for i in range(HV_STIMER_COUNT * HV_STIMER_MSR_STRIDE):
        table[HvRegisterName(R.HvRegisterStimer0Config + i)] = HvMsr(HvMsr.HV_X64_MSR_STIMER0_CONFIG + i)
    return table


SYNTHETIC_MSRS: dict[HvRegisterName, HvMsr] = _synthetic_msrs()
READ_ONLY_SYNTHETIC = frozenset({R.HvRegisterVpIndex, R.HvRegisterTimeRefCount, R.HvRegisterSversion})
WRITE_ONLY_SYNTHETIC = frozenset({R.HvRegisterEom})

SECURE_CONFIG_FIRST = R.HvRegisterVsmVpSecureConfigVtl0
SECURE_CONFIG_LAST = R.HvRegisterVsmVpSecureConfigVtl14
CR_INTERCEPT_REGISTERS = frozenset({
    R.HvX64RegisterCrInterceptControl, R.HvX64RegisterCrInterceptCr0Mask,
    R.HvX64RegisterCrInterceptCr4Mask, R.HvX64RegisterCrInterceptIa32MiscEnableMask,
})  # fmt: skip
READ_ONLY_VSM = frozenset({
    R.HvRegisterVsmCodePageOffsets, R.HvRegisterVsmVpStatus, R.HvRegisterVsmPartitionStatus,
    R.HvRegisterVsmCapabilities,
})  # fmt: skip

#: VsmCapabilities this VMM reports (OpenVMM/mshv layout, vsm-facts §6.1): DR6 is private (one
#: vCPU per VTL), no MBEC, DenyLowerVtlStartup is honoured by HvCallStartVirtualProcessor.
VSM_CAPABILITIES = int(VsmCapabilities.DENY_LOWER_VTL_STARTUP)
_PENDING_EVENT_RESERVED = ~(
    PendingExceptionEvent.EVENT_PENDING
    | (PendingExceptionEvent.EVENT_TYPE_MASK << PendingExceptionEvent.EVENT_TYPE_SHIFT)
    | PendingExceptionEvent.DELIVER_ERROR_CODE
    | (PendingExceptionEvent.VECTOR_MASK << PendingExceptionEvent.VECTOR_SHIFT)
    | (PendingExceptionEvent.ERROR_CODE_MASK << PendingExceptionEvent.ERROR_CODE_SHIFT)
) & _U64
_VINA_DEFINED = VsmVina.VECTOR_MASK | VsmVina.ENABLED | VsmVina.AUTO_RESET | VsmVina.AUTO_EOI
_VINA_FIRST_VECTOR = 16  # architectural: vectors below 16 are reserved for exceptions


def _fail(status: HvStatus) -> HandlerError:
    return HandlerError(status)


def _value(low: int, high: int = 0) -> bytes:
    return struct.pack("<QQ", low & _U64, high & _U64)


def _name(raw: int) -> HvRegisterName:
    try:
        return HvRegisterName(raw)
    except ValueError:
        raise _fail(HvStatus.HV_STATUS_INVALID_PARAMETER) from None


def _per_vp_vtl(name: HvRegisterName) -> bool:
    return name in ARCH_REGISTERS or name in SEGMENT_REGISTERS or name in TABLE_REGISTERS or name in SYNTHETIC_MSRS


def _check_vp_vtl(vsm: Vsm, name: HvRegisterName, vp: int, vtl: int) -> None:
    if _per_vp_vtl(name) and not vsm.state.vp_vtl(vp, vtl).enabled:
        raise _fail(HvStatus.HV_STATUS_INVALID_VTL_STATE)


def _secure_config_lower_vtl(name: HvRegisterName, owner: int) -> int:
    lower = name - SECURE_CONFIG_FIRST
    if lower >= owner:
        raise _fail(HvStatus.HV_STATUS_INVALID_PARAMETER)  # an instance exists only for lower VTLs
    return lower


def get_register(vsm: Vsm, vp: int, vtl: int, raw_name: int) -> bytes:
    """The 16-byte HV_REGISTER_VALUE of ``raw_name`` of (vp, vtl); raises HandlerError."""
    name = _name(raw_name)
    _check_vp_vtl(vsm, name, vp, vtl)
    access = vsm.partition.vp(vp)
    if name in ARCH_REGISTERS:
        return _value(int(access.get_register(vtl, ARCH_REGISTERS[name])))  # type: ignore[arg-type]
    if name in SEGMENT_REGISTERS:
        seg = access.get_register(vtl, SEGMENT_REGISTERS[name])
        assert isinstance(seg, Segment)
        return HvX64SegmentRegister(seg.base & _U64, seg.limit, seg.selector, seg.attributes).pack()
    if name in TABLE_REGISTERS:
        table = access.get_register(vtl, TABLE_REGISTERS[name])
        assert isinstance(table, Table)
        return HvX64TableRegister(table.limit, table.base & _U64).pack()
    if name in SYNTHETIC_MSRS:
        if name in WRITE_ONLY_SYNTHETIC:
            raise _fail(HvStatus.HV_STATUS_INVALID_PARAMETER)
        try:
            return _value(vsm.hv.msrs(vp, vtl).read(SYNTHETIC_MSRS[name]))
        except GpFault:
            raise _fail(HvStatus.HV_STATUS_INVALID_PARAMETER) from None
    state = vsm.state
    if name == R.HvRegisterVsmCodePageOffsets:
        return _value(HypercallPage.vsm_code_page_offsets(bit64=access.mode(vtl) != CpuMode.PROTECTED))
    if name == R.HvRegisterVsmVpStatus:
        enabled = sum(1 << v for v in state.enabled_on_vp(vp))
        value = (access.active_vtl & VsmVpStatus.ACTIVE_VTL_MASK) | (enabled << VsmVpStatus.ENABLED_VTL_SET_SHIFT)
        return _value(value)
    if name == R.HvRegisterVsmPartitionStatus:
        enabled = sum(1 << v for v in state.enabled_vtls)
        return _value(enabled | ((state.vtl_count - 1) << VsmPartitionStatus.MAXIMUM_VTL_SHIFT))
    if name == R.HvRegisterVsmCapabilities:
        return _value(VSM_CAPABILITIES)
    if name == R.HvRegisterVsmPartitionConfig:
        if vtl == 0:
            raise _fail(HvStatus.HV_STATUS_INVALID_PARAMETER)  # one instance per VTL > 0
        return _value(state.config(vtl).value)
    if SECURE_CONFIG_FIRST <= name <= SECURE_CONFIG_LAST:
        lower = _secure_config_lower_vtl(name, vtl)
        return _value(state.vp_vtl(vp, vtl).secure_config.get(lower, 0))
    if name == R.HvRegisterVsmVina:
        return _value(state.vp_vtl(vp, vtl).vina)
    if name in CR_INTERCEPT_REGISTERS:
        return _value(state.vp_vtl(vp, vtl).cr_intercepts.get(name, 0))
    if name == R.HvRegisterPendingEvent0:
        return _value(state.vp_vtl(vp, vtl).pending_event0 & ~PendingExceptionEvent.EVENT_PENDING)
    raise _fail(HvStatus.HV_STATUS_INVALID_PARAMETER)


def set_register(vsm: Vsm, caller_vp: int, caller_vtl: int, vp: int, vtl: int, raw_name: int, data: bytes) -> None:
    """Write ``data`` (HV_REGISTER_VALUE) to ``raw_name`` of (vp, vtl); raises HandlerError."""
    name = _name(raw_name)
    _check_vp_vtl(vsm, name, vp, vtl)
    data = bytes(data).ljust(HV_REGISTER_VALUE_SIZE, b"\0")
    low, high = struct.unpack("<QQ", data)
    access = vsm.partition.vp(vp)
    if name in ARCH_REGISTERS:
        if control_regs.register_problem(ARCH_REGISTERS[name], low):
            raise _fail(HvStatus.HV_STATUS_INVALID_REGISTER_VALUE)
        if ARCH_REGISTERS[name] in _CONTROL_STATE:
            _check_control_state(vsm, access, vtl, ARCH_REGISTERS[name], low)
        access.set_register(vtl, ARCH_REGISTERS[name], low)
        return
    if name in SEGMENT_REGISTERS:
        seg = HvX64SegmentRegister.unpack(data)
        if name == R.HvX64RegisterCs:
            _check_control_state(vsm, access, vtl, "cs", seg.attributes)
        access.set_register(vtl, SEGMENT_REGISTERS[name], Segment(seg.base, seg.limit, seg.selector, seg.attributes))
        return
    if name in TABLE_REGISTERS:
        table = HvX64TableRegister.unpack(data)
        access.set_register(vtl, TABLE_REGISTERS[name], Table(table.base, table.limit))
        return
    if name in SYNTHETIC_MSRS:
        if name in READ_ONLY_SYNTHETIC:
            raise _fail(HvStatus.HV_STATUS_INVALID_PARAMETER)
        try:
            vsm.hv.msrs(vp, vtl).write(SYNTHETIC_MSRS[name], low)
        except GpFault:
            raise _fail(HvStatus.HV_STATUS_INVALID_REGISTER_VALUE) from None
        return
    if name in READ_ONLY_VSM:
        raise _fail(HvStatus.HV_STATUS_INVALID_PARAMETER)
    state = vsm.state.vp_vtl(vp, vtl)
    if name == R.HvRegisterVsmPartitionConfig:
        if vtl == 0:
            raise _fail(HvStatus.HV_STATUS_INVALID_PARAMETER)
        vsm.write_partition_config(caller_vp, caller_vtl, vtl, low)
        return
    if SECURE_CONFIG_FIRST <= name <= SECURE_CONFIG_LAST:
        lower = _secure_config_lower_vtl(name, vtl)
        if low & ~int(VsmVpSecureConfig.TLB_LOCKED):
            raise _fail(HvStatus.HV_STATUS_INVALID_REGISTER_VALUE)  # MBEC is not offered; rest RsvdZ
        was_locked = bool(state.secure_config.get(lower, 0) & VsmVpSecureConfig.TLB_LOCKED)
        state.secure_config[lower] = low
        if was_locked and not low & VsmVpSecureConfig.TLB_LOCKED:
            vsm.tlb_locks_changed()
        vsm.state_changed()
        return
    if name == R.HvRegisterVsmVina:
        if low & VsmVina.ENABLED and (low & VsmVina.VECTOR_MASK) < _VINA_FIRST_VECTOR:
            raise _fail(HvStatus.HV_STATUS_INVALID_REGISTER_VALUE)
        state.vina = low & _VINA_DEFINED  # RsvdP bits read back as zero
        vsm.state_changed()
        return
    if name in CR_INTERCEPT_REGISTERS:
        state.cr_intercepts[name] = low
        return
    if name == R.HvRegisterPendingEvent0:
        _set_pending_event(vsm, vp, vtl, low, high)
        return
    raise _fail(HvStatus.HV_STATUS_INVALID_PARAMETER)


_CONTROL_STATE = ("cr0", "cr3", "cr4", "efer")


def _check_control_state(vsm: Vsm, access: VpAccess, vtl: int, changed: str, value: int) -> None:
    """INVALID_REGISTER_VALUE for a CR0/CR3/CR4/EFER/CS.L value the VP could not hold with the others."""
    state = {n: int(access.get_register(vtl, n)) for n in _CONTROL_STATE}  # type: ignore[arg-type]
    cs = access.get_register(vtl, "cs")
    attributes = cs.attributes if isinstance(cs, Segment) else 0
    if changed == "cs":
        attributes = value
    else:
        state[changed] = value
    if control_regs.problem(state["cr0"], state["cr3"], state["cr4"], state["efer"], attributes, vsm.ram_top()):
        raise _fail(HvStatus.HV_STATUS_INVALID_REGISTER_VALUE)


def _set_pending_event(vsm: Vsm, vp: int, vtl: int, low: int, high: int) -> None:
    """PendingEvent0, exception form: queue the exception in (vp, vtl) now.

    ExceptionParameter (bits 127:64) of a #PF becomes the target's CR2, as the processor
    would set it when delivering the fault.
    """
    p = PendingExceptionEvent
    if not low & p.EVENT_PENDING:
        vsm.state.vp_vtl(vp, vtl).pending_event0 = low
        return
    if (low >> p.EVENT_TYPE_SHIFT) & p.EVENT_TYPE_MASK != PendingEventType.EXCEPTION:
        raise _fail(HvStatus.HV_STATUS_INVALID_PARAMETER)  # only exceptions are injectable here
    vector = (low >> p.VECTOR_SHIFT) & p.VECTOR_MASK
    if low & _PENDING_EVENT_RESERVED or vector >= _X86_EXCEPTION_VECTORS:
        raise _fail(HvStatus.HV_STATUS_INVALID_REGISTER_VALUE)
    error_code = (low >> p.ERROR_CODE_SHIFT) & p.ERROR_CODE_MASK if low & p.DELIVER_ERROR_CODE else None
    access = vsm.partition.vp(vp)
    if vector == _X86_PAGE_FAULT:
        access.set_register(vtl, "cr2", high)
    access.inject_exception(vtl, vector, error_code)
    vsm.state.vp_vtl(vp, vtl).pending_event0 = low
