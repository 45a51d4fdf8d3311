"""Hyper-V emulation (everything a Hyper-V-aware guest uses except VSM).

Entry point: :class:`vmm.hyperv.facade.HyperV` (see its module docstring for the interface
the machine uses). Constants and layouts: :mod:`vmm.hyperv.hvdef`.
"""

from vsmtrace.vmm.hyperv.cpuid import HypervPolicy, hyperv_cpuid_leaves
from vsmtrace.vmm.hyperv.errors import GpFault, GuestCrash, GuestCrashReport, GuestResetRequest
from vsmtrace.vmm.hyperv.facade import HyperV, TlbFlusher
from vsmtrace.vmm.hyperv.hypercall import HypercallOutcome
from vsmtrace.vmm.hyperv.msrs import ApicAccess
from vsmtrace.vmm.hyperv.reference_time import ReferenceClock, TscPageParams

__all__ = [
    "ApicAccess",
    "GpFault",
    "GuestCrash",
    "GuestCrashReport",
    "GuestResetRequest",
    "HyperV",
    "HypercallOutcome",
    "HypervPolicy",
    "ReferenceClock",
    "TlbFlusher",
    "TscPageParams",
    "hyperv_cpuid_leaves",
]
