"""HvCallSendSyntheticClusterIpi and HvCallSendSyntheticClusterIpiEx.

Vector outside 0x10..0xFF → INVALID_HYPERCALL_INPUT (KVM and the seed QEMU; the TLFS gives
no status). The target VTL may be any VTL the partition has, above the caller's too: the
seed delivers a VTL0 → VTL1 IPI into the target VP's VTL1 APIC, and the TLFS is silent (an
interrupt is not a memory access; docs/vsm.md). Delivery is
``PartitionAccess.assert_interrupt`` into each target VP's APIC at the target VTL; an APIC of
a VTL not enabled on that VP is software-disabled and drops it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsmtrace.vmm.hyperv.handlers.common import HandlerError, bind, vp_mask_members, vp_set_from
from vsmtrace.vmm.hyperv.hvdef import (
    HV_IPI_VECTOR_MAX,
    HV_IPI_VECTOR_MIN,
    HvInputSendSyntheticClusterIpi,
    HvInputSendSyntheticClusterIpiEx,
    HvInputVtl,
    HvStatus,
    HypercallCode,
)
from vsmtrace.vmm.hyperv.hypercall import HypercallInput, HypercallResult, HypercallSpec

if TYPE_CHECKING:
    from vsmtrace.vmm.hyperv.facade import HyperV


def _check_vector(vector: int) -> None:
    if not HV_IPI_VECTOR_MIN <= vector <= HV_IPI_VECTOR_MAX:
        raise HandlerError(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT)


def _ipi_target_vtl(hv: HyperV, caller_vtl: int, raw: int) -> int:
    """HV_INPUT_VTL of an IPI: reserved bits, or a VTL above the caller that the partition has
    not enabled (or does not have) → INVALID_PARAMETER."""
    value = HvInputVtl.decode(raw)
    vtl = value.resolve(caller_vtl)
    if value.reserved or vtl >= hv.vtl_count:
        raise HandlerError(HvStatus.HV_STATUS_INVALID_PARAMETER)
    if vtl > caller_vtl and (hv.vtl_enabled is None or not hv.vtl_enabled(vtl)):
        raise HandlerError(HvStatus.HV_STATUS_INVALID_PARAMETER)
    return vtl


def _send(hv: HyperV, vps: list[int], vtl: int, vector: int) -> None:
    for vp in vps:
        hv.partition.assert_interrupt(vp, vtl, vector)


def send_ipi(hv: HyperV, inp: HypercallInput) -> HypercallResult:
    req = HvInputSendSyntheticClusterIpi.unpack(inp.header)
    _check_vector(req.vector)
    vtl = _ipi_target_vtl(hv, inp.vtl, req.target_vtl)
    _send(hv, vp_mask_members(hv, req.processor_mask), vtl, req.vector)
    return HypercallResult()


def send_ipi_ex(hv: HyperV, inp: HypercallInput) -> HypercallResult:
    req = HvInputSendSyntheticClusterIpiEx.unpack(inp.header)
    _check_vector(req.vector)
    vtl = _ipi_target_vtl(hv, inp.vtl, req.target_vtl)
    _send(hv, vp_set_from(hv, req.vp_set_format, req.valid_banks_mask, inp.var_header), vtl, req.vector)
    return HypercallResult()


def specs(hv: HyperV) -> list[HypercallSpec]:
    return [
        HypercallSpec(
            HypercallCode.HvCallSendSyntheticClusterIpi,
            bind(hv, send_ipi),
            input_size=HvInputSendSyntheticClusterIpi.SIZE,
            advertised=lambda p: p.pv_ipi,
        ),
        HypercallSpec(
            HypercallCode.HvCallSendSyntheticClusterIpiEx,
            bind(hv, send_ipi_ex),
            input_size=HvInputSendSyntheticClusterIpiEx.SIZE,
            variable_header=True,
            advertised=lambda p: p.pv_ipi_ex,
        ),
    ]
