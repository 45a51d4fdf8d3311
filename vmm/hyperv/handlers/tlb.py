"""HvCallFlushVirtualAddressSpace / List and their Ex (HV_VP_SET) forms.

The flush itself is the machine's (:class:`~vmm.hyperv.facade.TlbFlusher`): when
``flush_vps`` returns, no target VP at the target VTL may use a stale translation. A list
flush is carried out as a full flush of the targets (always correct, simpler than per-GVA
invalidation through KVM); the GVA ranges are still decoded and counted as reps.

Flag bits the TLFS does not define (e.g. garbage in bits 63:32 from an uninitialised struct)
are ignored, as KVM's in-kernel Hyper-V does and guests in the wild rely on, although the TLFS
says they must be zero (docs/vsm.md). They stay visible in the trace: the HYPERCALL event's
``input`` holds the flags word as the guest sent it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsmtrace.vmm.hyperv.handlers.common import HandlerError, bind, vp_mask_members, vp_set_from
from vsmtrace.vmm.hyperv.hvdef import (
    HV_FLUSH_TARGET_VTL_SHIFT,
    HV_FLUSH_VALID_FLAGS,
    HV_MAX_VTL_COUNT,
    HvFlushFlags,
    HvGvaRange,
    HvInputFlushVirtualAddressSpace,
    HvInputFlushVirtualAddressSpaceEx,
    HvStatus,
    HypercallCode,
)
from vsmtrace.vmm.hyperv.hypercall import HypercallInput, HypercallResult, HypercallSpec

if TYPE_CHECKING:
    from vsmtrace.vmm.hyperv.facade import HyperV


def _target_vtls(hv: HyperV, caller_vtl: int, flags: int, is_list: bool) -> list[int]:
    flags &= int(HV_FLUSH_VALID_FLAGS)  # undefined bits are ignored (module docstring)
    if flags & HvFlushFlags.USE_EXTENDED_RANGE_FORMAT:  # not advertised (CPUID EDX bit 14 clear)
        raise HandlerError(HvStatus.HV_STATUS_INVALID_PARAMETER)
    if is_list and flags & HvFlushFlags.NON_GLOBAL_MAPPINGS_ONLY:  # TLFS: invalid for list flushes
        raise HandlerError(HvStatus.HV_STATUS_INVALID_PARAMETER)
    if not flags & HvFlushFlags.USE_TARGET_VTL:
        return [caller_vtl]
    vtls = [v for v in range(HV_MAX_VTL_COUNT) if flags & (1 << (HV_FLUSH_TARGET_VTL_SHIFT + v))]
    for vtl in vtls:
        if vtl > caller_vtl:
            raise HandlerError(HvStatus.HV_STATUS_ACCESS_DENIED)
        if vtl >= hv.vtl_count:
            raise HandlerError(HvStatus.HV_STATUS_INVALID_PARAMETER)
    return vtls


def _flush(hv: HyperV, inp: HypercallInput, vps: list[int], vtls: list[int]) -> HypercallResult:
    """Flush, unless a higher VTL locked a target's TLB (VSM): then the caller waits and retries."""
    if hv.tlb_lock_check is not None and hv.tlb_lock_check(inp.vp, inp.vtl, vps, vtls):
        return HypercallResult(retry=True)
    for vtl in vtls:
        hv.tlb.flush_vps(vps, vtl)
    return HypercallResult()


def flush_space(hv: HyperV, inp: HypercallInput) -> HypercallResult:
    req = HvInputFlushVirtualAddressSpace.unpack(inp.header)
    vtls = _target_vtls(hv, inp.vtl, req.flags, is_list=False)
    vps = list(range(hv.vp_count)) if req.flags & HvFlushFlags.ALL_PROCESSORS else vp_mask_members(hv, req.processor_mask)
    return _flush(hv, inp, vps, vtls)


def flush_list(hv: HyperV, inp: HypercallInput) -> HypercallResult:
    req = HvInputFlushVirtualAddressSpace.unpack(inp.header)
    vtls = _target_vtls(hv, inp.vtl, req.flags, is_list=True)
    vps = list(range(hv.vp_count)) if req.flags & HvFlushFlags.ALL_PROCESSORS else vp_mask_members(hv, req.processor_mask)
    return _flush(hv, inp, vps, vtls)


def flush_space_ex(hv: HyperV, inp: HypercallInput) -> HypercallResult:
    req = HvInputFlushVirtualAddressSpaceEx.unpack(inp.header)
    vtls = _target_vtls(hv, inp.vtl, req.flags, is_list=False)
    vps = vp_set_from(hv, req.vp_set_format, req.valid_banks_mask, inp.var_header)
    if req.flags & HvFlushFlags.ALL_PROCESSORS:
        vps = list(range(hv.vp_count))
    return _flush(hv, inp, vps, vtls)


def flush_list_ex(hv: HyperV, inp: HypercallInput) -> HypercallResult:
    req = HvInputFlushVirtualAddressSpaceEx.unpack(inp.header)
    vtls = _target_vtls(hv, inp.vtl, req.flags, is_list=True)
    vps = vp_set_from(hv, req.vp_set_format, req.valid_banks_mask, inp.var_header)
    if req.flags & HvFlushFlags.ALL_PROCESSORS:
        vps = list(range(hv.vp_count))
    return _flush(hv, inp, vps, vtls)


def specs(hv: HyperV) -> list[HypercallSpec]:
    return [
        HypercallSpec(
            HypercallCode.HvCallFlushVirtualAddressSpace,
            bind(hv, flush_space),
            input_size=HvInputFlushVirtualAddressSpace.SIZE,
            advertised=lambda p: p.pv_tlb_flush,
        ),
        HypercallSpec(
            HypercallCode.HvCallFlushVirtualAddressList,
            bind(hv, flush_list),
            input_size=HvInputFlushVirtualAddressSpace.SIZE,
            rep=True,
            rep_input_size=HvGvaRange.SIZE,
            advertised=lambda p: p.pv_tlb_flush,
        ),
        HypercallSpec(
            HypercallCode.HvCallFlushVirtualAddressSpaceEx,
            bind(hv, flush_space_ex),
            input_size=HvInputFlushVirtualAddressSpaceEx.SIZE,
            variable_header=True,
            advertised=lambda p: p.pv_tlb_flush_ex,
        ),
        HypercallSpec(
            HypercallCode.HvCallFlushVirtualAddressListEx,
            bind(hv, flush_list_ex),
            input_size=HvInputFlushVirtualAddressSpaceEx.SIZE,
            rep=True,
            rep_input_size=HvGvaRange.SIZE,
            variable_header=True,
            advertised=lambda p: p.pv_tlb_flush_ex,
        ),
    ]
