"""The VSM hypercalls, registered in the Hyper-V dispatcher like every other handler.

The dispatcher already did the ABI part (CPL0/real-mode #UD, control-word checks, 8-byte
alignment, reading the input and probing the output *through the caller's VTL view* so a
protected GPA is ACCESS_DENIED with nothing written, fast/XMM register layouts and their
size limits). Handlers here only decide.

Statuses per call (TLFS where it speaks; otherwise the choice is noted):

* EnablePartitionVtl (simple; memory or fast): foreign partition → INVALID_PARTITION_ID;
  any flag (EnableMbec included: MBEC is not offered), a non-zero RsvdZ byte (offsets
  10-15) or a VTL number beyond the partition's → INVALID_PARAMETER; a target above the
  caller when the caller is not the highest enabled VTL below it → ACCESS_DENIED; already
  enabled (VTL0 included) → INVALID_PARAMETER (TLFS return table, seed; OpenVMM's
  VTL_ALREADY_ENABLED 0x86 is not a TLFS status).
* EnableVpVtl (memory only: 240 bytes): bad partition / VP → INVALID_PARTITION_ID /
  INVALID_VP_INDEX; VTL out of range → INVALID_PARAMETER; VTL not enabled for the
  partition → INVALID_VTL_STATE; already enabled on the VP (VTL0 included) → INVALID_PARAMETER
  (TLFS return table, seed); a caller
  below the target that is not the first enabler (highest enabled VTL below it, and no VP
  has the target yet) → ACCESS_DENIED.
* StartVirtualProcessor: as the TLFS table: ACCESS_DENIED (target above the caller, or a
  higher VTL set DenyLowerVtlStartup), INVALID_PARTITION_ID, INVALID_VP_INDEX,
  INVALID_VTL_STATE (target VTL not enabled on that VP), INVALID_VP_STATE (already started).
* Get/SetVpRegisters (rep; memory, fast, XMM fast): see :mod:`vmm.vsm.registers`; target
  above the caller → ACCESS_DENIED; a failing element stops the call with its index as
  reps completed.
* ModifyVtlProtectionMask (rep; memory, fast, XMM fast): see :meth:`Vsm.modify_protections`.
* TranslateVirtualAddress (simple; memory, fast + XMM output): see :mod:`vmm.vsm.translate`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from vsmtrace.vmm.hyperv.handlers.common import HandlerError, check_partition_id, target_vtl
from vsmtrace.vmm.hyperv.hvdef import (
    HV_ANY_VP,
    HV_GET_VP_REGISTERS_ELEMENT_SIZE,
    HV_GET_VP_REGISTERS_OUTPUT_SIZE,
    HV_GPA_PAGE_ELEMENT_SIZE,
    HV_PAGE_SHIFT,
    HV_TRANSLATE_GVA_INPUT_VTL_SHIFT,
    HV_VP_INDEX_SELF,
    HvInitialVpContext,
    HvInputEnablePartitionVtl,
    HvInputEnableVpVtl,
    HvInputGetSetVpRegisters,
    HvInputModifyVtlProtectionMask,
    HvInputStartVirtualProcessor,
    HvInputTranslateVirtualAddress,
    HvOutputTranslateVirtualAddress,
    HvPartitionPrivilege,
    HvRegisterAssoc,
    HvStatus,
    HvTranslateGvaControlFlags,
    HvX64SegmentRegister,
    HvX64TableRegister,
    HypercallCode,
)
from vsmtrace.vmm.hyperv.hypercall import HypercallInput, HypercallResult, HypercallSpec
from vsmtrace.vmm.vp import Segment, Table
from vsmtrace.vmm.vsm import control_regs, registers
from vsmtrace.vmm.vsm.services import InitialVpContext
from vsmtrace.vmm.vsm.translate import translate_gva

if TYPE_CHECKING:
    from vsmtrace.vmm.vsm import Vsm

S = HvStatus
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")
_TABLES = ("idtr", "gdtr")
_EFER_LME = 1 << 8  # architectural
_EFER_LMA = 1 << 10
_CR0_PG = 1 << 31
_TRANSLATE_FLAGS = (
    HvTranslateGvaControlFlags.VALIDATE_READ
    | HvTranslateGvaControlFlags.VALIDATE_WRITE
    | HvTranslateGvaControlFlags.VALIDATE_EXECUTE
    | HvTranslateGvaControlFlags.PRIVILEGE_EXEMPT
    | HvTranslateGvaControlFlags.SET_PAGE_TABLE_BITS
    | HvTranslateGvaControlFlags.TLB_FLUSH_INHIBIT
    | HvTranslateGvaControlFlags.SUPERVISOR_ACCESS
    | HvTranslateGvaControlFlags.USER_ACCESS
    | HvTranslateGvaControlFlags.ENFORCE_SMAP
    | HvTranslateGvaControlFlags.OVERRIDE_SMAP
)
_U64 = (1 << 64) - 1
_ENABLE_PARTITION_VTL_RSVD = 10  # offset of RsvdZ[6] in HvInputEnablePartitionVtl


def decode_context(raw: bytes, *, force_lma: bool = False) -> InitialVpContext:
    """HV_INITIAL_VP_CONTEXT → register dict with VP-interface names (``pat`` for MsrCrPat).

    ``force_lma`` sets EFER.LMA when LME and CR0.PG say long mode is active (the seed does
    this for StartVirtualProcessor; a guest-supplied EFER often leaves LMA to the CPU).
    """
    ctx = HvInitialVpContext.unpack(raw)
    regs: dict[str, object] = {"rip": ctx.rip, "rsp": ctx.rsp, "rflags": ctx.rflags}
    for name in _SEGMENTS:
        seg = HvX64SegmentRegister.unpack(getattr(ctx, name))
        regs[name] = Segment(seg.base, seg.limit, seg.selector, seg.attributes)
    for name in _TABLES:
        table = HvX64TableRegister.unpack(getattr(ctx, name))
        regs[name] = Table(table.base, table.limit)
    efer = ctx.efer
    if force_lma and efer & _EFER_LME and ctx.cr0 & _CR0_PG:
        efer |= _EFER_LMA
    regs.update(efer=efer, cr0=ctx.cr0, cr3=ctx.cr3, cr4=ctx.cr4, pat=ctx.msr_cr_pat)
    return InitialVpContext(regs)


def check_context(vsm: Vsm, context: InitialVpContext) -> InitialVpContext:
    """An initial context a CPU can hold, or INVALID_PARAMETER (KVM would refuse to load it)."""
    r = context.registers
    cs = r["cs"]
    assert isinstance(cs, Segment)
    why = control_regs.problem(int(r["cr0"]), int(r["cr3"]), int(r["cr4"]), int(r["efer"]), cs.attributes,  # type: ignore[call-overload]
                               vsm.ram_top())  # fmt: skip
    why = why or control_regs.register_problem("pat", int(r["pat"])) or control_regs.register_problem("efer", int(r["efer"]))  # type: ignore[call-overload]
    if why is not None:
        raise HandlerError(S.HV_STATUS_INVALID_PARAMETER)
    return context


def _vp_index(vsm: Vsm, inp: HypercallInput, raw: int) -> int:
    if raw == HV_VP_INDEX_SELF:
        return inp.vp
    if raw >= vsm.partition.vp_count:
        raise HandlerError(S.HV_STATUS_INVALID_VP_INDEX)
    return raw


def _vtl_number(vsm: Vsm, raw: int) -> int:
    """An HV_VTL byte (not HV_INPUT_VTL): must name a VTL this partition has."""
    if raw >= vsm.state.vtl_count:
        raise HandlerError(S.HV_STATUS_INVALID_PARAMETER)
    return raw


def _highest_enabled_below(vsm: Vsm, vtl: int) -> int:
    return max(v for v in vsm.state.enabled_vtls if v < vtl)


# -- VTL enablement --------------------------------------------------------------------------


def enable_partition_vtl(vsm: Vsm, inp: HypercallInput) -> HypercallResult:
    req = HvInputEnablePartitionVtl.unpack(inp.header)
    check_partition_id(vsm.hv, req.partition_id)
    if any(inp.header[_ENABLE_PARTITION_VTL_RSVD:HvInputEnablePartitionVtl.SIZE]):
        raise HandlerError(S.HV_STATUS_INVALID_PARAMETER)  # RsvdZ[6] at offsets 10-15 (R8 bits 63:16 when fast)
    if req.flags:
        raise HandlerError(S.HV_STATUS_INVALID_PARAMETER)  # MBEC and friends are not offered
    target = _vtl_number(vsm, req.target_vtl)
    if target > inp.vtl and _highest_enabled_below(vsm, target) != inp.vtl:
        raise HandlerError(S.HV_STATUS_ACCESS_DENIED)
    if target in vsm.state.enabled_vtls:
        raise HandlerError(S.HV_STATUS_INVALID_PARAMETER)
    vsm.enable_partition_vtl(inp.vp, inp.vtl, target)
    return HypercallResult()


def enable_vp_vtl(vsm: Vsm, inp: HypercallInput) -> HypercallResult:
    req = HvInputEnableVpVtl.unpack(inp.header)
    check_partition_id(vsm.hv, req.partition_id)
    vp = _vp_index(vsm, inp, req.vp_index)
    target = _vtl_number(vsm, req.target_vtl)
    state = vsm.state
    if target not in state.enabled_vtls:
        raise HandlerError(S.HV_STATUS_INVALID_VTL_STATE)
    if state.vp_vtl(vp, target).enabled:
        raise HandlerError(S.HV_STATUS_INVALID_PARAMETER)
    if target > inp.vtl:
        first = not any(state.vp_vtl(v, target).enabled for v in range(state.vp_count))
        if not first or _highest_enabled_below(vsm, target) != inp.vtl:
            raise HandlerError(S.HV_STATUS_ACCESS_DENIED)
    vsm.enable_vp_vtl(inp.vp, inp.vtl, vp, target, check_context(vsm, decode_context(req.context)))
    return HypercallResult()


def start_virtual_processor(vsm: Vsm, inp: HypercallInput) -> HypercallResult:
    req = HvInputStartVirtualProcessor.unpack(inp.header)
    check_partition_id(vsm.hv, req.partition_id)
    if req.vp_index == HV_VP_INDEX_SELF:
        raise HandlerError(S.HV_STATUS_INVALID_VP_STATE)  # the caller is running
    vp = _vp_index(vsm, inp, req.vp_index)
    target = _vtl_number(vsm, req.target_vtl)
    if target > inp.vtl:
        raise HandlerError(S.HV_STATUS_ACCESS_DENIED)
    state = vsm.state
    for owner in sorted(state.enabled_vtls):
        if owner > inp.vtl and state.config(owner).deny_lower_vtl_startup:
            raise HandlerError(S.HV_STATUS_ACCESS_DENIED)
    if not state.vp_vtl(vp, target).enabled:
        raise HandlerError(S.HV_STATUS_INVALID_VTL_STATE)
    if vp == inp.vp or vsm.services.vp_started(vp):
        raise HandlerError(S.HV_STATUS_INVALID_VP_STATE)
    vsm.services.load_vp_context(vp, target, check_context(vsm, decode_context(req.context, force_lma=True)))
    vsm.services.start_vp(vp, target)
    return HypercallResult()


# -- VP registers ----------------------------------------------------------------------------


def _register_target(vsm: Vsm, inp: HypercallInput) -> tuple[int, int]:
    req = HvInputGetSetVpRegisters.unpack(inp.header)
    check_partition_id(vsm.hv, req.partition_id)
    vp = _vp_index(vsm, inp, req.vp_index)
    vtl = target_vtl(vsm.hv, inp.vtl, req.target_vtl)
    return vp, vtl


def get_vp_registers(vsm: Vsm, inp: HypercallInput) -> HypercallResult:
    vp, vtl = _register_target(vsm, inp)
    outputs: list[bytes] = []
    for element in inp.rep_elements:
        (name,) = struct.unpack("<I", element)
        try:
            outputs.append(registers.get_register(vsm, vp, vtl, name))
        except HandlerError as err:
            return HypercallResult(err.status, rep_outputs=outputs)
    return HypercallResult(rep_outputs=outputs)


def set_vp_registers(vsm: Vsm, inp: HypercallInput) -> HypercallResult:
    vp, vtl = _register_target(vsm, inp)
    done = 0
    for element in inp.rep_elements:
        assoc = HvRegisterAssoc.unpack(element)
        try:
            registers.set_register(vsm, inp.vp, inp.vtl, vp, vtl, assoc.name, assoc.value)
        except HandlerError as err:
            return HypercallResult(err.status, reps_done=inp.rep_start + done)
        done += 1
    return HypercallResult()


# -- protections -----------------------------------------------------------------------------


def modify_vtl_protection_mask(vsm: Vsm, inp: HypercallInput) -> HypercallResult:
    req = HvInputModifyVtlProtectionMask.unpack(inp.header)
    check_partition_id(vsm.hv, req.partition_id)
    pages = [struct.unpack("<Q", element)[0] for element in inp.rep_elements]
    status, done = vsm.modify_protections(inp.vp, inp.vtl, req.target_vtl, req.map_flags, pages)
    return HypercallResult(status, reps_done=inp.rep_start + done)


# -- translation -----------------------------------------------------------------------------


def translate_virtual_address(vsm: Vsm, inp: HypercallInput) -> HypercallResult:
    req = HvInputTranslateVirtualAddress.unpack(inp.header)
    check_partition_id(vsm.hv, req.partition_id)
    if req.vp_index == HV_ANY_VP:
        raise HandlerError(S.HV_STATUS_INVALID_VP_INDEX)
    vp = _vp_index(vsm, inp, req.vp_index)
    flags = req.control_flags & ((1 << HV_TRANSLATE_GVA_INPUT_VTL_SHIFT) - 1)
    vtl = target_vtl(vsm.hv, inp.vtl, req.control_flags >> HV_TRANSLATE_GVA_INPUT_VTL_SHIFT)
    if flags & ~int(_TRANSLATE_FLAGS):
        raise HandlerError(S.HV_STATUS_INVALID_PARAMETER)  # reserved bits, shadow stack (no CET)
    F = HvTranslateGvaControlFlags
    if flags & F.USER_ACCESS and flags & F.SUPERVISOR_ACCESS:
        raise HandlerError(S.HV_STATUS_INVALID_PARAMETER)
    if not vsm.state.vp_vtl(vp, vtl).enabled:
        raise HandlerError(S.HV_STATUS_INVALID_VTL_STATE)
    overlays: set[int] = set()
    if vsm.hv.hypercall_page_enabled(vtl):
        overlays.add(vsm.hv.vtl_msrs(vtl).hypercall_gpa >> HV_PAGE_SHIFT)
    assist = vsm.hv.vp_assist_page_gpa(vp, vtl)
    if assist is not None:
        overlays.add(assist >> HV_PAGE_SHIFT)
    result = translate_gva(
        vsm.partition,
        vsm.partition.vp(vp),
        vtl,
        (req.gva_page << HV_PAGE_SHIFT) & _U64,
        flags,
        reader_vtl=vtl,  # the target VTL's own view: its protections apply to its page walks
        allowed=lambda page: vsm.lower_vtl_allowed(vtl, page),
        is_ram=vsm.is_ram_page,
        overlay_pages=overlays,
    )
    if flags & F.TLB_FLUSH_INHIBIT and vtl < inp.vtl:
        vsm.lock_tlb(vp, owner=inp.vtl, lower=vtl)
    return HypercallResult(output=HvOutputTranslateVirtualAddress(result.result_value(), result.gpa_page).pack())


# -- registration ----------------------------------------------------------------------------


def _bind(vsm: Vsm, fn: Callable[[Vsm, HypercallInput], HypercallResult]) -> Callable[[HypercallInput], HypercallResult]:
    def handler(inp: HypercallInput) -> HypercallResult:
        try:
            return fn(vsm, inp)
        except HandlerError as err:
            return err.result()

    handler.__name__ = fn.__name__
    return handler


def specs(vsm: Vsm) -> list[HypercallSpec]:
    """Specs of every VSM call (privilege bits as the seed kernel gates them, vsm-facts §1.7)."""
    vsm_gate = {"privilege": HvPartitionPrivilege.ACCESS_VSM, "advertised": lambda p: p.vsm}
    regs_gate = {"privilege": HvPartitionPrivilege.ACCESS_VP_REGISTERS, "advertised": lambda p: p.vp_registers}
    start_gate = {"privilege": HvPartitionPrivilege.START_VIRTUAL_PROCESSOR, "advertised": lambda p: p.start_vp}
    return [
        HypercallSpec(HypercallCode.HvCallEnablePartitionVtl, _bind(vsm, enable_partition_vtl),
                      input_size=HvInputEnablePartitionVtl.SIZE, **vsm_gate),  # type: ignore[arg-type]
        HypercallSpec(HypercallCode.HvCallEnableVpVtl, _bind(vsm, enable_vp_vtl),
                      input_size=HvInputEnableVpVtl.SIZE, **vsm_gate),  # type: ignore[arg-type]
        HypercallSpec(HypercallCode.HvCallModifyVtlProtectionMask, _bind(vsm, modify_vtl_protection_mask),
                      input_size=HvInputModifyVtlProtectionMask.SIZE, rep=True,
                      rep_input_size=HV_GPA_PAGE_ELEMENT_SIZE, **vsm_gate),  # type: ignore[arg-type]
        HypercallSpec(HypercallCode.HvCallTranslateVirtualAddress, _bind(vsm, translate_virtual_address),
                      input_size=HvInputTranslateVirtualAddress.SIZE,
                      output_size=HvOutputTranslateVirtualAddress.SIZE, **vsm_gate),  # type: ignore[arg-type]
        HypercallSpec(HypercallCode.HvCallGetVpRegisters, _bind(vsm, get_vp_registers),
                      input_size=HvInputGetSetVpRegisters.SIZE, rep=True,
                      rep_input_size=HV_GET_VP_REGISTERS_ELEMENT_SIZE,
                      rep_output_size=HV_GET_VP_REGISTERS_OUTPUT_SIZE, **regs_gate),  # type: ignore[arg-type]
        HypercallSpec(HypercallCode.HvCallSetVpRegisters, _bind(vsm, set_vp_registers),
                      input_size=HvInputGetSetVpRegisters.SIZE, rep=True,
                      rep_input_size=HvRegisterAssoc.SIZE, **regs_gate),  # type: ignore[arg-type]
        HypercallSpec(HypercallCode.HvCallStartVirtualProcessor, _bind(vsm, start_virtual_processor),
                      input_size=HvInputStartVirtualProcessor.SIZE, **start_gate),  # type: ignore[arg-type]
    ]  # fmt: skip

