"""HvCallSendSyntheticClusterIpi and HvCallSendSyntheticClusterIpiEx.

Vector outside 0x10..0xFF → INVALID_HYPERCALL_INPUT (KVM and the seed QEMU; the TLFS gives
no status). The target VTL must not be above the caller's. Delivery is
``PartitionAccess.assert_interrupt`` into each target VP's APIC at the target VTL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsmtrace.vmm.hyperv.handlers.common import HandlerError, bind, target_vtl, vp_mask_members, vp_set_from
from vsmtrace.vmm.hyperv.hvdef import (
    HV_IPI_VECTOR_MAX,
    HV_IPI_VECTOR_MIN,
    HvInputSendSyntheticClusterIpi,
    HvInputSendSyntheticClusterIpiEx,
    HvStatus,
    HypercallCode,
)
from vsmtrace.vmm.hyperv.hypercall import HypercallInput, HypercallResult, HypercallSpec

if TYPE_CHECKING:
    from vsmtrace.vmm.hyperv.facade import HyperV


def _check_vector(vector: int) -> None:
    if not HV_IPI_VECTOR_MIN <= vector <= HV_IPI_VECTOR_MAX:
        raise HandlerError(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT)


def _send(hv: HyperV, vps: list[int], vtl: int, vector: int) -> None:
    for vp in vps:
        hv.partition.assert_interrupt(vp, vtl, vector)


def send_ipi(hv: HyperV, inp: HypercallInput) -> HypercallResult:
    req = HvInputSendSyntheticClusterIpi.unpack(inp.header)
    _check_vector(req.vector)
    vtl = target_vtl(hv, inp.vtl, req.target_vtl)
    _send(hv, vp_mask_members(hv, req.processor_mask), vtl, req.vector)
    return HypercallResult()


def send_ipi_ex(hv: HyperV, inp: HypercallInput) -> HypercallResult:
    req = HvInputSendSyntheticClusterIpiEx.unpack(inp.header)
    _check_vector(req.vector)
    vtl = target_vtl(hv, inp.vtl, req.target_vtl)
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
