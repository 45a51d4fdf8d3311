"""What the VSM emulation asks of the machine, beyond the VP interface.

``vmm/vsm`` decides *what* happens (is this VTL call legal, which pages get which
mask, what the intercept message says); the machine (``vmm/backends/vsm.py`` over
KVM, or the replayer) decides *how*: which vCPU runs, which memslots exist. This
protocol is the boundary, so both sides can be tested alone.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from vsmtrace.vmm.vp import Access


class EntryReason(enum.IntEnum):
    """HV_VP_VTL_CONTROL.EntryReason (written into the entered VTL's VP assist page)."""

    RESERVED = 0
    VTL_CALL = 1
    INTERRUPT = 2
    INTERCEPT = 3


class SwitchReason(enum.Enum):
    """Why a VP changed VTL, as recorded in traces."""

    CALL = "call"
    RETURN = "return"
    INTERRUPT = "interrupt"
    INTERCEPT = "intercept"


@dataclass(frozen=True)
class VtlTransition:
    """A VTL switch the machine must perform at the next entry of the VP.

    ``return_rax_rcx`` is set for a non-fast VTL return: after the shared registers
    moved to the lower VTL, its RAX and RCX are loaded from these values (the higher
    VTL's VtlReturnX64Rax/Rcx).
    """

    vp: int
    from_vtl: int
    to_vtl: int
    reason: SwitchReason
    return_rax_rcx: tuple[int, int] | None = None


@dataclass(frozen=True)
class PageProtection:
    """The lower-VTL view of one run of pages: which accesses are allowed."""

    first_page: int  # guest page frame number
    count: int
    allowed: Access  # READ | WRITE | EXECUTE subset


@dataclass(frozen=True)
class InitialVpContext:
    """HV_INITIAL_VP_CONTEXT, decoded (segments as vmm.vp.Segment, tables as vmm.vp.Table)."""

    registers: dict[str, object]  # rip, rsp, rflags, cs..tr/ldtr, gdtr, idtr, efer, cr0, cr3, cr4, msr_cr_pat


class VsmServices(Protocol):
    """Machine services for VSM (implemented over KVM by vmm/backends/vsm.py)."""

    def create_vtl(self, vtl: int) -> None:
        """Make VTL ``vtl`` exist for the partition (its VM, memory view, vCPUs, APICs)."""
        ...

    def load_vp_context(self, vp: int, vtl: int, context: InitialVpContext) -> None:
        """Load an initial context into the vCPU of (vp, vtl) (HvCallEnableVpVtl / StartVirtualProcessor)."""
        ...

    def software_enable_apic(self, vp: int, vtl: int) -> None:
        """Set the (vp, vtl) local APIC's SVR to 0x1FF (HvCallEnableVpVtl of a VTL above 0)."""
        ...

    def start_vp(self, vp: int, vtl: int) -> None:
        """Start a VP that has not run yet, in ``vtl`` (HvCallStartVirtualProcessor)."""
        ...

    def vp_started(self, vp: int) -> bool:
        """Whether the VP has ever run (INIT/SIPI or StartVirtualProcessor)."""
        ...

    def request_transition(self, transition: VtlTransition) -> None:
        """Switch the VP's VTL before its next guest entry (called on that VP's thread)."""
        ...

    def set_protections(self, target_vtl: int, protections: Sequence[PageProtection]) -> None:
        """Apply protections to VTL ``target_vtl``'s view of memory; every VP sees them on return."""
        ...

    def flush_vps(self, vp_indices: Sequence[int], vtl: int) -> None:
        """Drop cached translations (same contract as vmm.hyperv TlbFlusher)."""
        ...
