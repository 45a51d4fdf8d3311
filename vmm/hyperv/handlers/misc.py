"""HvCallNotifyLongSpinWait, HvCallGetPartitionId, HvCallGetVpIndexFromApicId."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from vsmtrace.vmm.hyperv.handlers.common import bind, check_partition_id, target_vtl
from vsmtrace.vmm.hyperv.hvdef import (
    HV_APIC_ID_ELEMENT_SIZE,
    HV_VP_INDEX_ELEMENT_SIZE,
    HvInputGetVpIndexFromApicId,
    HvInputNotifyLongSpinWait,
    HvOutputGetPartitionId,
    HvPartitionPrivilege,
    HvStatus,
    HypercallCode,
)
from vsmtrace.vmm.hyperv.hypercall import HypercallInput, HypercallResult, HypercallSpec

if TYPE_CHECKING:
    from vsmtrace.vmm.hyperv.facade import HyperV

#: Names of the C implementations of these handlers (HypercallSpec.native): a machine's fast path answers
#: the calls in C while nothing records, with the semantics below (vmm/backends/hypercall_fastpath.py).
NATIVE_SPIN_WAIT = "notify_long_spin_wait"
NATIVE_VP_INDEX_FROM_APIC_ID = "get_vp_index_from_apic_id"


def notify_long_spin_wait(hv: HyperV, inp: HypercallInput) -> HypercallResult:
    """Advisory: always SUCCESS (TLFS). The machine may use ``hv.on_long_spin_wait`` to yield."""
    if hv.on_long_spin_wait is not None:
        hv.on_long_spin_wait(inp.vp, HvInputNotifyLongSpinWait.unpack(inp.header).spin_count)
    return HypercallResult()


def get_partition_id(hv: HyperV, inp: HypercallInput) -> HypercallResult:
    return HypercallResult(output=HvOutputGetPartitionId(hv.partition_id).pack())


def get_vp_index_from_apic_id(hv: HyperV, inp: HypercallInput) -> HypercallResult:
    header = HvInputGetVpIndexFromApicId.unpack(inp.header)
    check_partition_id(hv, header.partition_id)
    target_vtl(hv, inp.vtl, header.target_vtl)
    outputs: list[bytes] = []
    for element in inp.rep_elements:
        (apic_id,) = struct.unpack("<I", element)
        vp = hv.vp_index_from_apic_id(apic_id)
        if vp is None:
            return HypercallResult(HvStatus.HV_STATUS_INVALID_PARAMETER, rep_outputs=outputs)
        outputs.append(struct.pack("<I", vp))
    return HypercallResult(rep_outputs=outputs)


def specs(hv: HyperV) -> list[HypercallSpec]:
    return [
        HypercallSpec(
            HypercallCode.HvCallNotifyLongSpinWait,
            bind(hv, notify_long_spin_wait),
            input_size=HvInputNotifyLongSpinWait.SIZE,
            advertised=lambda p: p.spin_wait,
            native=NATIVE_SPIN_WAIT,
        ),
        HypercallSpec(
            HypercallCode.HvCallGetPartitionId,
            bind(hv, get_partition_id),
            output_size=HvOutputGetPartitionId.SIZE,
            privilege=HvPartitionPrivilege.ACCESS_PARTITION_ID,
        ),
        HypercallSpec(
            HypercallCode.HvCallGetVpIndexFromApicId,
            bind(hv, get_vp_index_from_apic_id),
            input_size=HvInputGetVpIndexFromApicId.SIZE,
            rep=True,
            rep_input_size=HV_APIC_ID_ELEMENT_SIZE,
            rep_output_size=HV_VP_INDEX_ELEMENT_SIZE,
            native=NATIVE_VP_INDEX_FROM_APIC_ID,
        ),
    ]

