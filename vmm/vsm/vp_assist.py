"""HV_VP_VTL_CONTROL in a VTL's VP assist page: entry reason, VINA status, VTL return registers.

The assist page is guest RAM named by the (VP, VTL)'s HV_X64_MSR_VP_ASSIST_PAGE (the seed PoC
model, not a hypervisor overlay). The control area belongs to the higher VTL, so it is read
and written through that VTL's own view of memory: the hypervisor acts for the page's owner.
A disabled assist page, or one outside RAM, simply has no control area.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsmtrace.vmm.hyperv.hvdef import HV_VINA_STATUS_ASSERTED, HvVpAssistPageLayout, HvVpVtlControl
from vsmtrace.vmm.vp import GuestMemoryError, PartitionAccess, VtlAccessDenied

if TYPE_CHECKING:
    from vsmtrace.vmm.hyperv.facade import HyperV


def control_gpa(hv: HyperV, vp: int, vtl: int) -> int | None:
    """GPA of the HV_VP_VTL_CONTROL of (vp, vtl), or None when the assist page is disabled."""
    base = hv.vp_assist_page_gpa(vp, vtl)
    return None if base is None else base + HvVpAssistPageLayout.VTL_CONTROL


def read_control(hv: HyperV, partition: PartitionAccess, vp: int, vtl: int) -> HvVpVtlControl | None:
    gpa = control_gpa(hv, vp, vtl)
    return None if gpa is None else read_control_at(partition, vtl, gpa)


def read_control_at(partition: PartitionAccess, vtl: int, gpa: int) -> HvVpVtlControl | None:
    """The control area at ``gpa`` (from :func:`control_gpa`), read through ``vtl``'s view."""
    raw = read_control_bytes_at(partition, vtl, gpa)
    return None if raw is None else HvVpVtlControl.unpack(raw)


def read_control_bytes_at(partition: PartitionAccess, vtl: int, gpa: int) -> bytes | None:
    """The raw HV_VP_VTL_CONTROL bytes at ``gpa``, or None if ``vtl`` cannot read them."""
    try:
        return partition.read_gpa(vtl, gpa, HvVpVtlControl.SIZE)
    except (GuestMemoryError, VtlAccessDenied):
        return None


def write_control_bytes_at(partition: PartitionAccess, vtl: int, gpa: int, data: bytes) -> bool:
    """Write raw HV_VP_VTL_CONTROL bytes through ``vtl``'s view; False if it cannot."""
    try:
        partition.write_gpa(vtl, gpa, data)
    except (GuestMemoryError, VtlAccessDenied):
        return False
    return True


def write_control(hv: HyperV, partition: PartitionAccess, vp: int, vtl: int, control: HvVpVtlControl) -> bool:
    gpa = control_gpa(hv, vp, vtl)
    return False if gpa is None else write_control_at(partition, vtl, gpa, control)


def write_control_at(partition: PartitionAccess, vtl: int, gpa: int, control: HvVpVtlControl) -> bool:
    return write_control_bytes_at(partition, vtl, gpa, control.pack())


def set_vina_asserted(hv: HyperV, partition: PartitionAccess, vp: int, vtl: int, asserted: bool) -> bool:
    """Set or clear VinaStatus.VinaAsserted; returns False without a usable assist page."""
    control = read_control(hv, partition, vp, vtl)
    if control is None:
        return False
    if asserted:
        control.vina_status |= HV_VINA_STATUS_ASSERTED
    else:
        control.vina_status &= ~HV_VINA_STATUS_ASSERTED & 0xFF
    return write_control(hv, partition, vp, vtl, control)


def vina_asserted(hv: HyperV, partition: PartitionAccess, vp: int, vtl: int) -> bool:
    control = read_control(hv, partition, vp, vtl)
    return control is not None and bool(control.vina_status & HV_VINA_STATUS_ASSERTED)
