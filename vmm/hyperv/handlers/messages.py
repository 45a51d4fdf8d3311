"""HvCallPostMessage and HvCallSignalEvent against the partition's :class:`Connections`.

Statuses (TLFS): unknown connection → INVALID_CONNECTION_ID; connection of the wrong kind →
INVALID_PORT_ID; message type 0 or with bit 31 set, payload > 240 bytes, flag number beyond
the port's count → INVALID_PARAMETER; target VP gone → INVALID_VP_INDEX; target SynIC / SIM /
SIEF page disabled or (events) SINT masked → INVALID_SYNIC_STATE; more than 16 queued
messages on a port → INSUFFICIENT_BUFFERS. SignalEvent's RsvdZ field non-zero →
INVALID_HYPERCALL_INPUT (as KVM).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsmtrace.vmm.hyperv.connections import EventPort, MessagePort
from vsmtrace.vmm.hyperv.handlers.common import bind
from vsmtrace.vmm.hyperv.hvdef import (
    HV_MESSAGE_BUFFERS_PER_PORT,
    HV_MESSAGE_MAX_PAYLOAD,
    HV_MESSAGE_TYPE_HYPERVISOR_MASK,
    HvInputPostMessage,
    HvInputSignalEvent,
    HvMessage,
    HvPartitionPrivilege,
    HvStatus,
    HypercallCode,
)
from vsmtrace.vmm.hyperv.hypercall import HypercallInput, HypercallResult, HypercallSpec

if TYPE_CHECKING:
    from vsmtrace.vmm.hyperv.facade import HyperV


def post_message(hv: HyperV, inp: HypercallInput) -> HypercallResult:
    req = HvInputPostMessage.unpack(inp.header)
    port = hv.connections.lookup(req.connection_id)
    if port is None:
        return HypercallResult(HvStatus.HV_STATUS_INVALID_CONNECTION_ID)
    if not isinstance(port, MessagePort):
        return HypercallResult(HvStatus.HV_STATUS_INVALID_PORT_ID)
    if req.message_type == 0 or req.message_type & HV_MESSAGE_TYPE_HYPERVISOR_MASK:
        return HypercallResult(HvStatus.HV_STATUS_INVALID_PARAMETER)
    if req.payload_size > HV_MESSAGE_MAX_PAYLOAD:
        return HypercallResult(HvStatus.HV_STATUS_INVALID_PARAMETER)
    vp, vtl = port.target(inp.vp, inp.vtl)
    if vp >= hv.vp_count or vtl >= hv.vtl_count:
        return HypercallResult(HvStatus.HV_STATUS_INVALID_VP_INDEX)
    origination = req.connection_id if port.origination_id is None else port.origination_id
    message = HvMessage.build(req.message_type, req.payload[: req.payload_size], origination_id=origination)
    limit = HV_MESSAGE_BUFFERS_PER_PORT if port.buffers is None else port.buffers
    status = hv.synic(vp, vtl).post(port.sint, message, guest=True, source=("port", req.connection_id), limit=limit)
    return HypercallResult(status)


def signal_event(hv: HyperV, inp: HypercallInput) -> HypercallResult:
    req = HvInputSignalEvent.unpack(inp.header)
    if req.reserved:
        return HypercallResult(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT)
    port = hv.connections.lookup(req.connection_id)
    if port is None:
        return HypercallResult(HvStatus.HV_STATUS_INVALID_CONNECTION_ID)
    if not isinstance(port, EventPort):
        return HypercallResult(HvStatus.HV_STATUS_INVALID_PORT_ID)
    if req.flag_number >= port.flag_count:
        return HypercallResult(HvStatus.HV_STATUS_INVALID_PARAMETER)
    vp, vtl = port.target(inp.vp, inp.vtl)
    if vp >= hv.vp_count or vtl >= hv.vtl_count:
        return HypercallResult(HvStatus.HV_STATUS_INVALID_VP_INDEX)
    return HypercallResult(hv.synic(vp, vtl).signal_event(port.sint, port.base_flag + req.flag_number))


def specs(hv: HyperV) -> list[HypercallSpec]:
    return [
        HypercallSpec(
            HypercallCode.HvCallPostMessage,
            bind(hv, post_message),
            input_size=HvInputPostMessage.SIZE,
            privilege=HvPartitionPrivilege.POST_MESSAGES,
            advertised=lambda p: p.synic,
        ),
        HypercallSpec(
            HypercallCode.HvCallSignalEvent,
            bind(hv, signal_event),
            input_size=HvInputSignalEvent.SIZE,
            privilege=HvPartitionPrivilege.SIGNAL_EVENTS,
            advertised=lambda p: p.synic,
        ),
    ]
