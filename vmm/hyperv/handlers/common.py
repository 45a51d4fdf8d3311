"""Helpers shared by handlers: VP sets and target-VTL resolution."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vsmtrace.vmm.hyperv.hvdef import (
    HV_PARTITION_ID_SELF,
    HV_PROCESSOR_MASK_BITS,
    HvGenericSetFormat,
    HvInputVtl,
    HvStatus,
    HvVpSet,
)
from vsmtrace.vmm.hyperv.hypercall import HypercallInput, HypercallResult

if TYPE_CHECKING:
    from vsmtrace.vmm.hyperv.facade import HyperV


class HandlerError(Exception):
    """Raised inside a handler to return a status (keeps validation code flat)."""

    def __init__(self, status: HvStatus) -> None:
        super().__init__(status.name)
        self.status = status

    def result(self) -> HypercallResult:
        return HypercallResult(self.status)


def vp_set_from(hv: HyperV, set_format: int, valid_banks_mask: int, var_header: bytes) -> list[int]:
    """VP indices of an HV_VP_SET whose banks are the variable header."""
    if set_format not in (HvGenericSetFormat.SPARSE_4K, HvGenericSetFormat.ALL):
        raise HandlerError(HvStatus.HV_STATUS_INVALID_PARAMETER)
    banks = [int.from_bytes(var_header[i : i + 8], "little") for i in range(0, len(var_header), 8)]
    vp_set = HvVpSet(set_format, valid_banks_mask, banks)
    try:
        return vp_set.vp_indices(hv.vp_count)
    except ValueError:
        raise HandlerError(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT) from None


def vp_mask_members(hv: HyperV, mask: int) -> list[int]:
    """VP indices named by a 64-bit processor mask (bits beyond the partition are ignored)."""
    return [vp for vp in range(min(hv.vp_count, HV_PROCESSOR_MASK_BITS)) if mask & (1 << vp)]


def target_vtl(hv: HyperV, caller_vtl: int, raw: int) -> int:
    """Resolve an HV_INPUT_VTL byte: reserved bits → INVALID_PARAMETER; higher than the
    caller → ACCESS_DENIED; a VTL the partition does not have → INVALID_PARAMETER."""
    if raw & HvInputVtl.RESERVED_MASK:  # HvInputVtl.decode(raw).reserved, without building one per call
        raise HandlerError(HvStatus.HV_STATUS_INVALID_PARAMETER)
    vtl = raw & HvInputVtl.TARGET_VTL_MASK if raw & HvInputVtl.USE_TARGET_VTL else caller_vtl
    if vtl > caller_vtl:
        raise HandlerError(HvStatus.HV_STATUS_ACCESS_DENIED)
    if vtl >= hv.vtl_count:
        raise HandlerError(HvStatus.HV_STATUS_INVALID_PARAMETER)
    return vtl


def check_partition_id(hv: HyperV, partition_id: int) -> None:
    if partition_id not in (HV_PARTITION_ID_SELF, hv.partition_id):
        raise HandlerError(HvStatus.HV_STATUS_INVALID_PARTITION_ID)


def bind(hv: HyperV, fn: Callable[[HyperV, HypercallInput], HypercallResult]) -> Callable[[HypercallInput], HypercallResult]:
    """Bind a handler to the partition and turn HandlerError into its status."""

    def handler(inp: HypercallInput) -> HypercallResult:
        try:
            return fn(hv, inp)
        except HandlerError as err:
            return err.result()

    handler.__name__ = fn.__name__
    return handler
